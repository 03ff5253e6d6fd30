"""The tests' names for starting the real trainer: thin wrappers over trainer/launch.py, the one
launcher (free port, command, start, wait with a timeout, kill the process group).

`launch` starts plain env:// ranks unless told `launcher="deepspeed"`: the `deepspeed` runner costs
about 20 s of CPU per run before training starts, so only the tests of the launcher itself (and one
layout run in test_train.py, so that every trainer path runs under it too) pay for it."""
from __future__ import annotations

import subprocess
from pathlib import Path

from trainer.launch import BIN, ENTRY, ROOT, run_killing_group, start, trainer_args  # noqa: F401 (re-exported)


def tiny_overrides(data: Path, run_dir: Path, **extra) -> list:
    base = {"data.path": str(data), "model.vocab_size": 1024, "train.output_dir": str(run_dir),
            "train.log_every": 1, "wandb.mode": "disabled", "eval.batches": 2,
            "train.global_batch_size": 16, "train.micro_batch_size": 8}   # tiny preset, smaller steps
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def launch(nproc: int, overrides: list, ds_config: str = "ds_configs/zero2.json",
           config: str = "configs/tiny.yaml", check: bool = True, timeout: int = 600,
           env: dict = None, script: str = ENTRY, launcher: str = "env") -> subprocess.CompletedProcess:
    """Run to the end; stdout holds every process's output (stderr is empty, kept for callers)."""
    args = trainer_args(overrides, config=config, ds_config=ds_config, script=script)
    run = start(nproc, args, launcher=launcher, env=env)
    try:
        rc = run.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"trainer did not end within {timeout} s:\n{run.text()[-6000:]}") from None
    text = run.text()
    if check and rc != 0:
        raise AssertionError(f"trainer failed ({rc}):\n{text[-12000:]}")
    return subprocess.CompletedProcess(run.cmd, rc, text, "")


def read_metrics(run_dir: Path) -> list:
    from trainer.metrics import read_rows   # non-finite values come back as floats
    return read_rows(str(run_dir / "metrics.jsonl"))


def per_step(run_dir: Path, key: str) -> dict:
    return {row["step"]: row[key] for row in read_metrics(run_dir) if key in row}
