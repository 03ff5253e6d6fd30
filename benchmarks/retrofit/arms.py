"""The demonstration's training runs: a token-choice pretrain and three fine-tuning arms with the
same steps and the same expected k (matched FLOPs), all through the real trainer.

Each run is one process started by plain python with the env:// variables a launcher would set
(the deepspeed launcher's start-up costs ~20 s of CPU per run and adds nothing for one rank).
"""
from __future__ import annotations

import os
import subprocess
import time

from trainer import launch
from trainer.launch import Launch, trainer_args

from .task import ROOT

# token choice as the preset's balancing has it (aux loss), dropless, no timestep schedule
TC = {"moe.router": "token_choice", "moe.capacity.schedule": "static", "moe.capacity_factor": None}


def arm_specs(k: int, k_max: float) -> dict:
    """Name -> overrides for the three fine-tuning arms. linear_reverse runs k from 1 to k_max
    with flop_match=check: the trainer refuses it unless E[k] is within 1% of k (the arms' FLOPs)."""
    return {
        "tc_ft": dict(TC),
        "ec_static": {"moe.router": "expert_choice", "moe.capacity.schedule": "static"},
        "ec_linear_reverse": {"moe.router": "expert_choice", "moe.capacity.schedule": "linear_reverse",
                              "moe.capacity.k_min": 1, "moe.capacity.k_max": k_max,
                              "moe.capacity.flop_match": "check", "moe.capacity.k_target": k},
    }


def to_args(over: dict) -> list:
    return [f"{k}={'null' if v is None else v}" for k, v in over.items()]


def start(run_dir: str, over: dict, log_path: str, config: str = "configs/tiny.yaml") -> Launch:
    """The trainer as one rank (trainer/launch.py, env://), output to `log_path`."""
    args = trainer_args(to_args({"train.output_dir": run_dir, "wandb.mode": "disabled", **over}), config=config)
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    open(log_path, "w").close()   # a fresh log per start
    return launch.start(1, args, launcher="env", env={"OMP_NUM_THREADS": "1"}, log=log_path, cwd=ROOT)


def wait_all(procs: dict, logs: dict, timeout: float) -> dict:
    """Wait for every run; a failure or a timeout kills the rest and raises with the log's tail.
    Returns seconds per run (from the wait's start)."""
    t0, took = time.time(), {}
    try:
        for name, p in procs.items():
            left = max(1.0, timeout - (time.time() - t0))
            try:
                p.wait(timeout=left)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"run {name} did not finish within {timeout:.0f} s; log: {logs[name]}") from None
            if p.returncode != 0:
                with open(logs[name]) as f:
                    tail = f.read()[-5000:]
                raise RuntimeError(f"run {name} failed ({p.returncode}); log {logs[name]}:\n{tail}")
            took[name] = time.time() - t0
    finally:   # never leave a run training behind a failed one
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return took


def run_all(specs: dict, out_dir: str, timeout: float) -> dict:
    """Start every run of `specs` (name -> overrides) at once, wait for all; name -> run dir."""
    dirs = {n: os.path.join(out_dir, n) for n in specs}
    logs = {n: os.path.join(out_dir, f"{n}.log") for n in specs}
    procs = {n: start(dirs[n], over, logs[n]) for n, over in specs.items()}
    wait_all(procs, logs, timeout)
    return dirs
