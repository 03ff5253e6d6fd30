"""Run the real trainer through the real `deepspeed` launcher (or plain python / mpiexec)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def tiny_overrides(data: Path, run_dir: Path, **extra) -> list:
    base = {"data.path": str(data), "model.vocab_size": 1024, "train.output_dir": str(run_dir),
            "train.log_every": 1, "wandb.mode": "disabled", "eval.batches": 2,
            "train.global_batch_size": 16, "train.micro_batch_size": 8}   # tiny preset, smaller steps
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def launch(nproc: int, overrides: list, ds_config: str = "ds_configs/zero2.json",
           config: str = "configs/tiny.yaml", check: bool = True, timeout: int = 600,
           env: dict = None, script: str = "train.py") -> subprocess.CompletedProcess:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
           script, "--ds_config", ds_config, "--config", config, *overrides]
    proc = run_killing_group(cmd, timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_killing_group(cmd: list, timeout: int, env: dict) -> subprocess.CompletedProcess:
    """subprocess.run, except that a timeout kills the launcher's whole process group: killing
    only the launcher would leave its rank processes training behind the rest of the suite."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def read_metrics(run_dir: Path) -> list:
    from trainer.metrics import read_rows   # non-finite values come back as floats
    return read_rows(str(run_dir / "metrics.jsonl"))


def per_step(run_dir: Path, key: str) -> dict:
    return {row["step"]: row[key] for row in read_metrics(run_dir) if key in row}
