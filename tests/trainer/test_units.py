"""Small trainer rules checked directly: which checkpoint resume picks, pruning, LR schedules."""
import math

import pytest

from rundir.checkpoints import file_digest, find_checkpoint, prune, write_manifest
from trainer.schedule import lr_multiplier


def make_ckpt(root, step, complete=True):
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "weights").write_text("x")
    if complete:
        write_manifest(str(d), step, {"weights": file_digest(str(d / "weights"))}, healthy=True)
    return d


def test_resume_ignores_incomplete_and_follows_latest(tmp_path):
    root = tmp_path / "checkpoints"
    make_ckpt(root, 10)
    make_ckpt(root, 20)
    make_ckpt(root, 30, complete=False)   # a save interrupted mid-write
    assert find_checkpoint(str(tmp_path), "auto").endswith("step_00000020")
    (root / "latest").write_text("step_00000010\n")
    assert find_checkpoint(str(tmp_path), "auto").endswith("step_00000010")
    (root / "latest").write_text("step_00000030\n")   # points at an incomplete one: fall back
    assert find_checkpoint(str(tmp_path), "auto").endswith("step_00000020")
    assert find_checkpoint(str(tmp_path), "never") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        find_checkpoint(str(tmp_path), str(root / "step_00000030"))
    assert find_checkpoint(str(tmp_path / "elsewhere"), "auto") is None


def test_a_damaged_newest_checkpoint_is_skipped_and_named(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    make_ckpt(root, 10)
    newest = make_ckpt(root, 20)
    (root / "latest").write_text("step_00000020\n")
    (newest / "weights").write_text("y")                # same size, other bytes
    with caplog.at_level("WARNING", logger="ecdlm"):
        assert find_checkpoint(str(tmp_path), "auto").endswith("step_00000010")
    assert "step_00000020/weights: checksum differs" in caplog.text
    (newest / "weights").write_text("")                 # truncated
    with pytest.raises(FileNotFoundError, match="0 bytes, the manifest says 1"):
        find_checkpoint(str(tmp_path), str(newest))


def test_prune_never_drops_the_newest_healthy_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    make_ckpt(root, 10)
    for s in (20, 30):
        d = make_ckpt(root, s)
        write_manifest(str(d), s, {"weights": file_digest(str(d / "weights"))}, healthy=False)
    prune(str(root), keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000010", "step_00000030"]


def test_prune_keeps_last_k_complete_and_drops_stale_partials(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (10, 20, 30, 40):
        make_ckpt(root, s)
    make_ckpt(root, 25, complete=False)
    make_ckpt(root, 50, complete=False)   # newer than the newest complete: a save in progress
    prune(str(root), keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000030", "step_00000040", "step_00000050"]


def test_cosine_and_wsd_schedules():
    kw = dict(warmup=10, total=110, min_ratio=0.1)
    assert lr_multiplier(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(60, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(500, schedule="cosine", **kw) == pytest.approx(0.1)
    wsd = dict(schedule="wsd", decay_fraction=0.2, **kw)   # decay over the last 22 steps
    assert lr_multiplier(50, **wsd) == 1.0 and lr_multiplier(87, **wsd) == 1.0
    assert lr_multiplier(99, **wsd) == pytest.approx(1 - 0.9 * 11 / 22)
    assert lr_multiplier(110, **wsd) == pytest.approx(0.1)
    assert all(math.isfinite(lr_multiplier(s, schedule="cosine", warmup=0, total=1, min_ratio=0)) for s in range(3))
