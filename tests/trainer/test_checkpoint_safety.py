"""Every reader of a checkpoint verifies it, whatever path it is given; an unreadable checkpoint
is damaged (named, skipped, not counted towards keep_last); temporaries are never written
through planted links; `latest` never leads outside the run; checkpoints/zero_to_fp32.py takes
DeepSpeed's own calls. Issue 20, items 3, 5, 6, 7, 9, 10 (the sampler) and 12."""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.synthetic_run import reseal, write_run
from rundir import checkpoint_store, checkpoints
from rundir.checkpoint_store import FragmentReader, consolidate
from rundir.checkpoints import CheckpointError, find_checkpoint, prune, write_manifest
from trainer.engine.checkpoint import write_consolidation_script


def resolve_checkpoint(path):
    return checkpoints.resolve_checkpoint(path)


def write_latest(root, step):
    return checkpoints.write_latest(root, step)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def run(tmp_path):
    return tmp_path / "run", write_run(tmp_path / "run")


def one_line_error(proc) -> str:
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    return err[0]


def flip_bytes(path, n=4096) -> None:
    """4 KiB of 0xFF at the end of a file: same size, other bytes (the issue's damage)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(max(0, size - n))
        f.write(b"\xff" * min(n, size))


# ---- item 5: every reader verifies, whatever path it is given -----------------------------------
@pytest.mark.parametrize("given", ["step", "checkpoints", "run"])
def test_a_damaged_step_is_never_read_whatever_path_the_tools_get(run, given):
    run_dir, ckpts = run
    flip_bytes(ckpts[6] / "tensors" / "rank00000.safetensors")
    path = {"step": ckpts[6], "checkpoints": run_dir / "checkpoints", "run": run_dir}[given]
    if given == "step":   # named: refused, naming the file
        with pytest.raises(CheckpointError, match=r"step_00000006/tensors/rank00000.safetensors: checksum differs"):
            resolve_checkpoint(str(path))
        with pytest.raises(CheckpointError, match="checksum differs"):
            consolidate(str(path), str(run_dir / "out.safetensors"))
        assert not (run_dir / "out.safetensors").exists()
    else:                 # a run or its checkpoints/: the newest good one
        assert resolve_checkpoint(str(path)) == str(ckpts[4])


def test_sampler_and_export_given_a_damaged_step_refuse_it_in_one_line(run, tmp_path):
    run_dir, ckpts = run
    flip_bytes(ckpts[6] / "tensors" / "rank00001.safetensors")
    for cmd in (["evaluation.sample", str(ckpts[6]), "--prompt", "x"],
                ["evaluation.hf", "export", str(ckpts[6]), str(tmp_path / "hf")]):
        proc = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
        line = one_line_error(proc)
        assert "rank00001.safetensors: checksum differs" in line
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


@pytest.mark.parametrize("case, words", [
    ("missing", "no such file or directory"),
    ("empty", "an empty directory"),
    ("no_checkpoint", "has no complete checkpoint yet"),
    ("not_a_run", "not a run directory"),
])
def test_sampler_says_which_of_the_ways_a_path_holds_no_checkpoint(tmp_path, case, words):
    path = tmp_path / case
    if case != "missing":
        path.mkdir()
    if case == "no_checkpoint":
        (path / "checkpoints").mkdir()
        (path / "config.yaml").write_text("train: {}\n")
    if case == "not_a_run":
        (path / "notes.txt").write_text("hello")
    proc = subprocess.run([sys.executable, "-m", "evaluation.sample", str(path), "--prompt", "x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert words in one_line_error(proc)


# ---- item 9: a checkpoint whose manifest verifies but which cannot be read is damaged -----------
def _records(ckpt, rank=0):
    return json.loads((ckpt / "tensors" / f"rank{rank:05d}.json").read_text())


def _write_records(ckpt, records, rank=0):
    (ckpt / "tensors" / f"rank{rank:05d}.json").write_text(json.dumps(records))


def damage(ckpt, case):
    tensors = ckpt / "tensors"
    if case == "dotdot_name":
        r = _records(ckpt)
        r[0]["name"] = "../" + r[0]["name"]
        r[0]["key"] = f"{r[0]['name']}/{r[0]['kind']}@{r[0]['start']}"
        _write_records(ckpt, r)
    elif case == "offset_past_tensor":
        r = _records(ckpt)
        r[0]["start"] = 10 ** 6
        r[0]["key"] = f"{r[0]['name']}/{r[0]['kind']}@{r[0]['start']}"
        _write_records(ckpt, r)
    elif case == "offset_past_file":   # a header whose data_offsets point past the end of the data
        st = tensors / "rank00000.safetensors"
        raw = st.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        key = next(k for k in header if k != "__metadata__")
        lo, hi = header[key]["data_offsets"]
        header[key]["data_offsets"] = [lo + 10 ** 6, hi + 10 ** 6]
        new = json.dumps(header).encode()
        new += b" " * (-len(new) % 8)
        st.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    elif case == "unknown_field":
        r = _records(ckpt)
        r[0]["file"] = "/etc/passwd"
        _write_records(ckpt, r)
    elif case == "symlinked_tensor_file":
        st = tensors / "rank00000.safetensors"
        outside = ckpt.parent.parent / "elsewhere.safetensors"
        shutil.copyfile(st, outside)
        st.unlink()
        st.symlink_to(outside)
    elif case == "state_not_json":
        (ckpt / "state.json").write_text("{not json")
    elif case == "state_missing_fields":
        (ckpt / "state.json").write_text(json.dumps({"step": 6}))
    elif case == "state_oversized":
        (ckpt / "state.json").write_text(json.dumps({"step": 6}) + " " * 20000)
    elif case == "huge_header":
        st = tensors / "rank00001.safetensors"
        raw = st.read_bytes()
        st.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    elif case == "planted_index":
        shutil.copyfile(tensors / "rank00000.json", tensors / "rank00009.json")
        shutil.copyfile(tensors / "rank00000.safetensors", tensors / "rank00009.safetensors")
    reseal(ckpt)


DAMAGE = {"dotdot_name": "is not a dotted parameter name", "offset_past_tensor": "lie past the end",
          "offset_past_file": "past the file's", "unknown_field": "has fields",
          "symlinked_tensor_file": "not a plain file inside the checkpoint",
          "state_not_json": "state.json is not valid JSON", "state_missing_fields": "field 'adam_step'",
          "state_oversized": "larger than", "huge_header": "not a safetensors file",
          "planted_index": "not listed in COMPLETE"}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_an_unreadable_checkpoint_is_named_and_the_older_good_one_used(run, case, caplog, monkeypatch):
    run_dir, ckpts = run
    if case == "state_oversized":
        monkeypatch.setattr(checkpoint_store, "MAX_JSON_BYTES", 16384)   # a 200 MB file, scaled down
    damage(ckpts[6], case)
    with caplog.at_level(logging.WARNING, logger="ecdlm"):
        assert find_checkpoint(str(run_dir), "auto") == str(ckpts[6].parent / "step_00000004")
    assert "step_00000006" in caplog.text and DAMAGE[case] in caplog.text, caplog.text
    with pytest.raises(CheckpointError, match=DAMAGE[case]):   # named directly: refused, by name
        find_checkpoint(str(run_dir), str(ckpts[6]))


def test_the_fragment_reader_itself_refuses_a_record_with_extra_fields(run):
    _, ckpts = run
    damage(ckpts[6], "unknown_field")
    with pytest.raises(CheckpointError, match=r"rank00000.json: record 0 has fields"):
        FragmentReader(str(ckpts[6]))


# ---- item 3: damaged or abandoned checkpoints do not count towards keep_last --------------------
def test_a_damaged_checkpoint_does_not_count_towards_keep_last(run, caplog):
    run_dir, ckpts = run
    root = run_dir / "checkpoints"
    flip_bytes(ckpts[6] / "tensors" / "rank00000.safetensors")   # the newest: the resume falls back to 4
    (ckpts[6] / "state.json").write_text("{}")                   # and a size change prune can see
    assert find_checkpoint(str(run_dir), "auto") == str(ckpts[4])
    from tests.trainer.synthetic_run import tiny_cfg, write_checkpoint
    new = write_checkpoint(root, 5, tiny_cfg())                  # the resumed run saves step 5
    write_latest(str(root), 5)
    with caplog.at_level(logging.WARNING, logger="ecdlm"):
        prune(str(root), keep_last=2, current=str(new), exclude=[str(ckpts[6])])
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000004", "step_00000005", "step_00000006"]   # 4 kept, 6 left for a person


def test_a_damaged_older_checkpoint_is_not_counted_nor_removed(run):
    run_dir, ckpts = run
    root = run_dir / "checkpoints"
    (ckpts[4] / "state.json").write_text("{}")                   # damaged, in a way sizes show
    from tests.trainer.synthetic_run import tiny_cfg, write_checkpoint
    new = write_checkpoint(root, 8, tiny_cfg())
    prune(str(root), keep_last=3, current=str(new))
    # three usable ones kept (2, 6, 8): the damaged 4 took no healthy one's place, and stays
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == \
        ["step_00000002", "step_00000004", "step_00000006", "step_00000008"]


def test_an_abandoned_checkpoint_that_still_verifies_by_size_is_not_counted(run):
    run_dir, ckpts = run
    root = run_dir / "checkpoints"
    flip_bytes(ckpts[6] / "tensors" / "rank00000.safetensors")   # same size: only the checksum sees it
    from tests.trainer.synthetic_run import tiny_cfg, write_checkpoint
    new = write_checkpoint(root, 8, tiny_cfg())
    prune(str(root), keep_last=2, current=str(new), exclude=[str(ckpts[6])])
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == \
        ["step_00000004", "step_00000006", "step_00000008"]


# ---- item 6: temporaries are created exclusively, never through a planted link -----------------
def test_planted_links_at_the_old_temporary_names_are_never_written_through(run, tmp_path):
    run_dir, ckpts = run
    root = run_dir / "checkpoints"
    victims = {}
    for name in ("latest.tmp", "zero_to_fp32.py.tmp"):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious\n")
        (root / name).symlink_to(victim)
        victims[name] = victim
    (ckpts[4] / "COMPLETE.tmp").symlink_to(victims["latest.tmp"])
    write_consolidation_script(str(root))
    write_manifest(str(ckpts[4]), 4, json.loads((ckpts[4] / "COMPLETE").read_text())["files"], healthy=True)
    assert all(v.read_text() == "precious\n" for v in victims.values())
    write_latest(str(root), 4)
    assert all(v.read_text() == "precious\n" for v in victims.values())
    assert (root / "latest").read_text() == "step_00000004\n" and not (root / "latest").is_symlink()
    latest_link = root / "latest"   # a link planted at the final name is replaced, not followed
    latest_link.unlink()
    latest_link.symlink_to(victims["latest.tmp"])
    write_latest(str(root), 6)
    assert victims["latest.tmp"].read_text() == "precious\n" and (root / "latest").read_text() == "step_00000006\n"


# ---- item 7: `latest` stays inside checkpoints/ -------------------------------------------------
@pytest.mark.parametrize("target", ["../../other/checkpoints/step_00000007", "/tmp/step_00000007", "step_6"])
def test_latest_naming_anything_but_a_step_inside_the_run_is_refused(run, tmp_path, target):
    run_dir, _ = run
    other = tmp_path / "other"
    write_run(other, steps=(7,))
    (run_dir / "checkpoints" / "latest").write_text(target + "\n")
    with pytest.raises(CheckpointError, match=r"latest names .* not a step_XXXXXXXX checkpoint inside"):
        find_checkpoint(str(run_dir), "auto")


def test_a_step_folder_that_is_a_link_to_another_run_is_refused(run, tmp_path):
    run_dir, ckpts = run
    other = write_run(tmp_path / "other", steps=(7,))
    (run_dir / "checkpoints" / "step_00000007").symlink_to(other[7])
    (run_dir / "checkpoints" / "latest").write_text("step_00000007\n")
    with pytest.raises(CheckpointError, match="a link, not a checkpoint of this run"):
        find_checkpoint(str(run_dir), "auto")


# ---- item 12: checkpoints/zero_to_fp32.py takes DeepSpeed's calls ------------------------------
def _script(root, *args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # runs on its own, outside the repo
    return subprocess.run([sys.executable, str(root / "zero_to_fp32.py"), *args], cwd=cwd or root, env=env,
                          capture_output=True, text=True, timeout=300)


def _weights(ckpt) -> dict:
    return {n: t.float() for n, t in FragmentReader(str(ckpt)).iter_full()}


def _shards(folder) -> dict:
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(folder / "model.safetensors"))
    got = {}
    for s in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        got.update(load_file(str(folder / s)))
    return got


def test_zero_to_fp32_takes_deepspeeds_documented_commands(run):
    """The commands of docs/operations-safety.md, as DeepSpeed documents its own script."""
    run_dir, ckpts = run
    root = run_dir / "checkpoints"
    for args, ckpt, out in (((".", "output_dir/"), 6, "output_dir"),
                            ((".", "safe_dir/", "--safe_serialization"), 6, "safe_dir"),
                            ((".", "tagged_dir/", "-t", "step_00000004", "--max_shard_size", "20KB"), 4, "tagged_dir")):
        proc = _script(root, *args)
        assert proc.returncode == 0, proc.stderr
        got, want = _shards(root / out), _weights(ckpts[ckpt])
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want), args
    index = json.loads((root / "tagged_dir" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.startswith("model-0000") and s.endswith(f"-of-{len(shards):05d}.safetensors")
                                   for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in _weights(ckpts[4]).values())
    assert not (root / "output_dir" / "model.safetensors.index.json").exists()   # one shard: no index
    # the old form still works: one checkpoint directory, one file
    proc = _script(root, "step_00000002", "one_file.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(load_file(str(root / "one_file.safetensors"))["embed.weight"], _weights(ckpts[2])["embed.weight"])


def test_verify_cli_names_every_damaged_checkpoint(run, capsys):
    run_dir, ckpts = run
    flip_bytes(ckpts[4] / "tensors" / "rank00001.safetensors")
    assert checkpoints.main(["verify", str(run_dir)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok ") and out[2].startswith("ok ")
    assert out[1].startswith("DAMAGED") and "step_00000004/tensors/rank00001.safetensors: checksum differs" in out[1]


def test_zero_to_fp32_refuses_damage_bad_tags_and_existing_outputs_in_one_line(run, tmp_path):
    run_dir, ckpts = run
    root = run_dir / "checkpoints"
    flip_bytes(ckpts[6] / "tensors" / "rank00000.safetensors")
    assert "checksum differs" in one_line_error(_script(root, ".", str(tmp_path / "a")))
    assert "not a step_XXXXXXXX" in one_line_error(_script(root, ".", str(tmp_path / "b"), "-t", "../../x"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "model.safetensors").write_text("mine")
    assert "exists; nothing was written" in one_line_error(_script(root, ".", str(tmp_path / "c"), "-t",
                                                                   "step_00000004"))
    assert (tmp_path / "c" / "model.safetensors").read_text() == "mine"
