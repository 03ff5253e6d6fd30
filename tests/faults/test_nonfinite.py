"""Divergence (issue 13, item 1): optim.lr=1e8 with no warm-up makes the first update huge; from
the second step on the gradients are NaN. Every rank must agree, skip those steps without
touching the weights, log them as NaN (not as null, not as ZeRO's -1 stand-in), and stop with
status 87 and one line naming the step and the value."""
import math

import torch

from rundir.state import full_model_state
from tests.faults.faultrun import Run, complete_steps, first_error_line, overrides
from tests.trainer.launch import read_metrics

EXIT_DIVERGED = 87


def test_nonfinite_steps_are_skipped_then_the_run_stops(small_corpus, tmp_path):
    run_dir = tmp_path / "diverge"
    run = Run.env(2, overrides(small_corpus, run_dir, **{
        "optim.lr": "1e8", "optim.warmup_steps": 0, "train.max_steps": 8, "train.save_every": 1,
        "train.keep_last": 10, "train.max_skipped_steps": 2, "moe.ep_size": 2, "train.comm_timeout_s": 123}))
    rc, text = run.finish(), run.text()
    assert rc == EXIT_DIVERGED, text[-4000:]
    # train.comm_timeout_s reached DeepSpeed's expert groups too (they use torch's default otherwise)
    assert ("collective timeouts: world 123 s, expert_parallel/ep_size_2 123 s, "
            "expert_data_parallel/ep_size_2 123 s") in text
    line = first_error_line(text)
    assert "step 4: non-finite" in line and "grad norm nan" in line and "train.max_skipped_steps=2" in line, line

    rows = {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}
    assert sorted(rows) == [1, 2, 3, 4]
    assert math.isfinite(rows[1]["train/grad_norm"]) and rows[1]["train/skipped_steps"] == 0
    for step in (2, 3, 4):   # the real norm, not ZeRO's sqrt(groups) = 1.732 made of -1s
        assert math.isnan(rows[step]["train/grad_norm"]) and rows[step]["train/skipped_steps"] == 1, rows[step]
    assert '"train/grad_norm": "nan"' in (run_dir / "metrics.jsonl").read_text()
    assert rows[2]["train/lr"] == rows[4]["train/lr"], "a skipped step must not advance the LR schedule"

    # checkpoints 1..3 were written (4 stopped the run before its save); none was lost, and the
    # skipped steps 2 and 3 left every weight exactly as step 1 wrote it
    assert complete_steps(run_dir) == [1, 2, 3]
    ckpt = run_dir / "checkpoints"
    first = full_model_state(str(ckpt / "step_00000001"))
    assert all(torch.isfinite(v).all() for v in first.values() if v.is_floating_point())
    for step in (2, 3):
        later = full_model_state(str(ckpt / f"step_{step:08d}"))
        assert later.keys() == first.keys()
        changed = [k for k in first if not torch.equal(first[k], later[k])]
        assert not changed, f"skipped step {step} changed {changed[:3]}"


def test_policy_stop_stops_at_the_first_nonfinite_step(small_corpus, tmp_path):
    """train.nonfinite=stop, one process: status 87 at step 2, nothing saved after step 1."""
    run_dir = tmp_path / "stop"
    run = Run.env(1, overrides(small_corpus, run_dir, **{
        "optim.lr": "1e8", "optim.warmup_steps": 0, "train.max_steps": 6, "train.save_every": 1,
        "train.nonfinite": "stop"}))
    rc, text = run.finish(), run.text()
    assert rc == EXIT_DIVERGED, text[-4000:]
    line = first_error_line(text)
    assert "step 2: non-finite" in line and "train.nonfinite=stop" in line, line
    assert complete_steps(run_dir) == [1]
