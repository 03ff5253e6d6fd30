"""The demonstration's training runs: a token-choice pretrain and three fine-tuning arms with the
same steps and the same expected k (matched FLOPs), all through the real trainer.

Each run is one process started by plain python with the env:// variables a launcher would set
(the deepspeed launcher's start-up costs ~20 s of CPU per run and adds nothing for one rank).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run_dir: str, over: dict, log_path: str, config: str = "configs/tiny.yaml") -> subprocess.Popen:
    """The trainer as one rank, output to `log_path`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "train.py", "--ds_config", "ds_configs/zero2.json", "--config", config,
           *to_args({"train.output_dir": run_dir, "wandb.mode": "disabled", **over})]
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    log = open(log_path, "w")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    finally:
        log.close()   # the child holds its own descriptor


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
