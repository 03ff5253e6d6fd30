"""Tools that never replace a prepared dataset unasked, shards whose ids are checked as they are
read, and bad input answered with one line and exit 2 instead of a traceback. Issue 20, items 4,
8, 10 (YAML, ds_config, --tokenizer, binary --files) and 11."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from trainer.data import PackedLoader, TokenStore
from rundir.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def prepare(*args):
    return run("-m", "trainer.data", "prepare", *args)


def error_lines(proc) -> list:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]


@pytest.fixture
def corpus_copy(small_corpus, tmp_path):
    return shutil.copytree(small_corpus, tmp_path / "data")


def small_files(folder, n=12):
    folder.mkdir()
    for i in range(n):
        (folder / f"d{i}.txt").write_text(f"document {i}: " + " ".join(f"word{j % 37}" for j in range(i, i + 200)))
    return str(folder / "*.txt")


# ---- item 4 --------------------------------------------------------------------------------------
def test_prepare_into_a_prepared_dataset_is_refused_unless_overwrite(corpus_copy, tmp_path):
    before = {p: p.read_bytes() for p in (corpus_copy / "meta.json", corpus_copy / "tokenizer.model")}
    files = small_files(tmp_path / "src")
    lines = error_lines(prepare("--out", corpus_copy, "--files", files, "--vocab-size", 300, "--num-workers", 0))
    assert len(lines) == 1 and "is a prepared dataset; nothing was changed" in lines[0] and "--overwrite" in lines[0]
    assert all(p.read_bytes() == b for p, b in before.items())
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    assert "is not empty" in error_lines(prepare("--out", other, "--files", files, "--num-workers", 0))[0]
    proc = prepare("--out", corpus_copy, "--files", files, "--vocab-size", 300, "--num-workers", 0, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (corpus_copy / "tokenizer.model").read_bytes() != before[corpus_copy / "tokenizer.model"]


def test_the_documented_prepare_commands(tmp_path):
    """docs/operations-safety.md: a new directory, refused the second time, replaced with --overwrite."""
    small_files(tmp_path / "src")
    cmd = ["--out", "data/mine", "--files", "src/*.txt", "--vocab-size", 300, "--num-workers", 0]
    first = subprocess.run([sys.executable, "-m", "trainer.data", "prepare", *map(str, cmd)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert first.returncode == 0, first.stderr[-3000:]
    meta = (tmp_path / "data" / "mine" / "meta.json").read_bytes()
    again = subprocess.run([sys.executable, "-m", "trainer.data", "prepare", *map(str, cmd)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert "is a prepared dataset" in error_lines(again)[0]
    assert (tmp_path / "data" / "mine" / "meta.json").read_bytes() == meta
    over = subprocess.run([sys.executable, "-m", "trainer.data", "prepare", *map(str, cmd), "--overwrite"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert over.returncode == 0, over.stderr[-3000:]


# ---- item 8 --------------------------------------------------------------------------------------
def _poison(split_dir, offset, value=65535, n=64):
    shard = split_dir / "shard_00000.bin"
    data = np.fromfile(shard, dtype=np.uint16)
    data[offset:offset + n] = value
    data.tofile(shard)   # the same size: the size check of preflight passes


def test_ids_beyond_the_vocabulary_are_named_by_shard_and_offset(corpus_copy):
    _poison(corpus_copy / "train", 1000)
    store = TokenStore(corpus_copy / "train")   # preflight's own check: sizes, as before
    assert store.read(0, 1000).max() < 1024
    with pytest.raises(DataError, match=r"train/shard_00000.bin: token id 65535 at token offset 1000 \(byte 2000\) "
                                        r"is not below the vocabulary size 1024"):
        store.read(990, 1100)
    _poison(corpus_copy / "train", 0, n=len(store))   # every sequence: the loader's first batch hits it
    loader = PackedLoader(corpus_copy / "train", 64, 4, 2, 0, 1, seed=0)
    try:
        with pytest.raises(DataError, match=r"shard_00000.bin: token id 65535 at token offset \d+"):
            loader.next_micro_batch()
    finally:
        loader.close()


def test_the_trainer_stops_on_a_damaged_shard_with_one_line_and_exit_2(corpus_copy, tmp_path):
    from tests.faults.faultrun import overrides
    _poison(corpus_copy / "train", 0, n=10 ** 9)
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    from tests.distributed import free_port
    env["MASTER_PORT"] = str(free_port())
    proc = subprocess.run([sys.executable, "train.py", "--ds_config", "ds_configs/zero2.json", "--config",
                           "configs/tiny.yaml", *overrides(corpus_copy, tmp_path / "run", **{"train.max_steps": 2})],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "shard_00000.bin: token id 65535 at token offset" in errors[0], proc.stderr[-3000:]
    assert "IndexError" not in proc.stderr and "Traceback" not in proc.stderr


# ---- item 10: prepare's inputs -----------------------------------------------------------------
def test_a_missing_or_corrupt_tokenizer_is_named_as_given(tmp_path):
    files = small_files(tmp_path / "src")
    missing = tmp_path / "missing.model"
    lines = error_lines(prepare("--out", tmp_path / "a", "--files", files, "--tokenizer", missing))
    assert len(lines) == 1 and f"--tokenizer {missing}: no such file" in lines[0]
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(bytes(range(256)) * 4)
    lines = error_lines(prepare("--out", tmp_path / "b", "--files", files, "--tokenizer", corrupt,
                                "--num-workers", 0))
    assert len(lines) == 1 and f"{corrupt} is not a sentencepiece model" in lines[0] and ".prepare-tmp" not in lines[0]


def test_all_binary_files_say_why_they_were_skipped(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)) * 8)
    lines = error_lines(prepare("--out", tmp_path / "out", "--files", tmp_path / "src" / "blob.txt",
                                "--num-workers", 0))
    assert len(lines) == 1 and "blob.txt: not valid UTF-8" in lines[0], lines


# ---- items 10 and 11: the trainer's configuration ------------------------------------------------
@pytest.mark.parametrize("case, text, words", [
    ("malformed_yaml", "model:\n  d_model: [128\n", "is not valid YAML"),
    ("empty_yaml", "", "is empty: it would train the built-in default model"),
    ("comments_only", "# nothing here\n", "is empty"),
    ("ds_config_list", None, "holds a JSON list; it must be an object"),
])
def test_bad_configs_are_one_line_and_exit_2(tmp_path, case, text, words):
    args = ["--config", "configs/tiny.yaml"]
    if text is not None:
        (tmp_path / "c.yaml").write_text(text)
        args = ["--config", tmp_path / "c.yaml"]
    if case == "ds_config_list":
        (tmp_path / "ds.json").write_text('[{"zero_optimization": {"stage": 2}}]')
        args += ["--ds_config", tmp_path / "ds.json", f"train.output_dir={tmp_path / 'run'}"]
    proc = run("train.py", *args)
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr[-2000:]
