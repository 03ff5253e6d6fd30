"""`python -m evaluation.hf` never destroys a user's files and never reads outside what it was
given; LLaDA-MoE exports name the release's classes. Issue 20, items 1, 2, 7 (weight_map), 10
(a model.safetensors that is not one), 13."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.evaluation.test_hf import (ecdlm_logits, llada_fields, llada_reference_logits, random_llada_tensors,
                                      write_llada_dir)
from tests.trainer.synthetic_run import write_run
from evaluation.hf.importer import load_hf_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hf(*args):
    return subprocess.run([sys.executable, "-m", "evaluation.hf", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def one_line_error(proc) -> str:
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), (proc.returncode, proc.stderr)
    return err[0]


@pytest.fixture
def llada_dir(tmp_path):
    c = llada_fields()
    tensors = random_llada_tensors(c)
    write_llada_dir(tmp_path / "llada", c, tensors)
    return tmp_path / "llada"


# ---- item 1 --------------------------------------------------------------------------------------
def test_import_into_an_existing_run_or_a_non_empty_directory_is_refused(tmp_path, llada_dir):
    run_dir = tmp_path / "run"
    ckpts = write_run(run_dir)
    before = {p: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "checkpoints" / "latest")}
    line = one_line_error(hf("import", llada_dir, run_dir))
    assert "is a training run" in line and "nothing was written" in line
    assert all(p.read_bytes() == b for p, b in before.items())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        [c.name for c in ckpts.values()]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    assert "is not empty" in one_line_error(hf("import", llada_dir, other))
    assert os.listdir(other) == ["todo.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = hf("import", llada_dir, empty)   # an empty directory (or a new path) is what import is for
    assert proc.returncode == 0, proc.stderr
    assert (empty / "checkpoints" / "step_00000000" / "COMPLETE").exists()


# ---- item 2 --------------------------------------------------------------------------------------
def test_export_never_deletes_or_replaces_files_it_did_not_write(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir)
    out = tmp_path / "out"
    out.mkdir()
    fp32 = out / "model_fp32.safetensors"
    save_file({"x": torch.ones(3)}, str(fp32))        # written by zero_to_fp32.py
    (out / "model.backup.safetensors").write_bytes(b"a user's backup")
    line = one_line_error(hf("export", run_dir, out))
    assert "model.backup.safetensors was not written by an ecdlm export" in line
    assert sorted(os.listdir(out)) == ["model.backup.safetensors", "model_fp32.safetensors"]
    (out / "model.backup.safetensors").unlink()
    assert "model_fp32.safetensors was not written by an ecdlm export" in one_line_error(hf("export", run_dir, out))
    assert torch.equal(load_file(str(fp32))["x"], torch.ones(3))
    (out / "config.json").write_text("{}")             # not a weight file, but one an export would replace
    fp32.unlink()
    assert "config.json was not written" in one_line_error(hf("export", run_dir, out))
    assert (out / "config.json").read_text() == "{}"


def test_a_re_export_replaces_only_what_the_earlier_export_wrote(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir)
    out = tmp_path / "out"
    assert hf("export", run_dir, out, "--max-shard-size", "20KB").returncode == 0
    assert (out / "model.safetensors.index.json").exists()
    (out / "README.md").write_text("notes")            # a file no export writes: left alone
    proc = hf("export", run_dir, out)                  # now one shard: the old shards go, nothing else
    assert proc.returncode == 0, proc.stderr
    names = sorted(os.listdir(out))
    assert "README.md" in names and "model.safetensors" in names
    assert not any(n.startswith("model-0") or n.endswith("index.json") for n in names)
    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    assert "model.safetensors was not written by an ecdlm export (or changed" in one_line_error(hf("export", run_dir, out))


# ---- item 7: weight_map entries stay inside the directory; item 10: a fake model.safetensors ---
def test_a_weight_map_entry_outside_the_directory_is_refused(tmp_path):
    c = llada_fields()
    tensors = random_llada_tensors(c)
    good = tmp_path / "good"
    write_llada_dir(good, c, tensors)
    evil = tmp_path / "evil"
    write_llada_dir(evil, c, {k: torch.zeros_like(v) for k, v in tensors.items()})
    (evil / "model.safetensors").unlink()
    (evil / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../good/model.safetensors" for k in tensors}}))
    with pytest.raises(ValueError, match=r"weight_map\[.*\] = '../good/model.safetensors' is not a .safetensors "
                                         r"file name in .*evil; refusing to read outside the directory"):
        load_hf_dir(str(evil))
    line = one_line_error(hf("import", evil, tmp_path / "run"))
    assert "refusing to read outside the directory" in line and not (tmp_path / "run").exists()


def test_import_of_a_model_safetensors_that_is_not_one_names_the_file(tmp_path, llada_dir):
    (llada_dir / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    line = one_line_error(hf("import", llada_dir, tmp_path / "run"))
    assert f"{llada_dir}/model.safetensors: not a safetensors file" in line


# ---- item 13: LLaDA-MoE exports name the release's classes ---------------------------------------
# A stand-in for the release's configuration_lladamoe.py, written here from what it defines (class
# LLaDAConfig, model_type "llada"): the released files cannot be fetched in a test. It fixes the
# naming contract auto_map must meet; docs/operations-safety.md says which transformers versions load
# the release's own modeling code.
RELEASE_CONFIG_STANDIN = '''
from transformers import PretrainedConfig

class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
'''


def test_llada_moe_export_auto_map_names_the_releases_config_class(tmp_path):
    from transformers import AutoConfig
    run_dir = tmp_path / "run"
    write_run(run_dir)
    out = tmp_path / "hf"
    proc = hf("export", run_dir, out, "--format", "llada-moe")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoConfig"] == "configuration_lladamoe.LLaDAConfig"
    assert cfg["auto_map"]["AutoModel"] == "modeling_lladamoe.LLaDAMoEModelLM" and cfg["model_type"] == "llada"
    (out / "configuration_lladamoe.py").write_text(RELEASE_CONFIG_STANDIN)
    loaded = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    assert type(loaded).__name__ == "LLaDAConfig" and loaded.num_experts == 4


def test_the_releases_forward_ignores_attention_mask_where_ecdlm_masks_pad_keys(tmp_path, llada_dir):
    """The released modeling code never applies attention_mask: padded rows attend to the pads.
    Its forward is the reference forward with the mask dropped. ecdlm masks pad keys, so on
    padded input the two differ at real positions, and on unpadded input they agree."""
    c = llada_fields()
    tensors = random_llada_tensors(c)
    cfg, state = load_hf_dir(str(llada_dir))
    ids = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(3))
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, :3] = False
    release = llada_reference_logits(c, tensors, ids, attention_mask=None)   # what the release computes
    ours = ecdlm_logits(cfg, state, ids, valid)
    assert float((ours[0] - release[0]).abs().max()) < 1e-5               # the unpadded row: the same
    assert float((ours[1][valid[1]] - release[1][valid[1]]).abs().max()) > 1e-3   # the padded row: not
    masked = llada_reference_logits(c, tensors, ids, attention_mask=valid)
    assert float((ours[1][valid[1]] - masked[1][valid[1]]).abs().max()) < 1e-5
