"""A real launched training run that a test can attack while it runs: find its rank processes,
wait for a step, signal or stop a rank, then collect the exit status and output.

Every test here asserts three things: the exit status, that the first line naming an error is
about the fault injected, and that no complete checkpoint was lost."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from tests.distributed import free_port
from tests.trainer.launch import BIN, ROOT

# the tiny preset, small and short: 2 CPU cores are shared by everything
FAULT_OVERRIDES = {"train.log_every": 1, "wandb.mode": "disabled", "eval.batches": 1, "eval.batch_size": 4,
                   "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.seq_len": 64,
                   "model.vocab_size": 1024, "train.eval_every": 1000}


def overrides(data: Path, run_dir: Path, **extra) -> list:
    base = {"data.path": str(data), "train.output_dir": str(run_dir), **FAULT_OVERRIDES, **extra}
    return [f"{k}={v}" for k, v in base.items()]


class Run:
    """`deepspeed` (or another launcher command) in its own session, output to files."""

    def __init__(self, cmd: list, env: dict = None):
        self.out = tempfile.NamedTemporaryFile("w+", prefix="fault_", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    @classmethod
    def deepspeed(cls, nproc: int, args: list, ds_config: str = "ds_configs/zero2.json", env: dict = None):
        return cls([str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
                    "train.py", "--ds_config", ds_config, "--config", "configs/tiny.yaml", *args], env)

    def ranks(self) -> dict:
        """{rank: psutil.Process} of the trainer processes under this launcher."""
        out = {}
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return out
        for p in kids:
            try:
                if any(part.endswith("train.py") for part in p.cmdline()):
                    env = p.environ()
                    rank = env.get("RANK") or env.get("PMI_RANK")
                    if rank is not None:
                        out[int(rank)] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out

    def wait_for(self, what: str, cond, timeout: float = 600) -> None:
        """Poll until cond() (the run must still be going)."""
        end = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended ({self.proc.returncode}) before {what}:\n{self.text()[-4000:]}")
            if time.monotonic() > end:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.text()[-4000:]}")
            time.sleep(0.5)

    def wait_for_step(self, run_dir: Path, step: int, timeout: float = 600) -> None:
        self.wait_for(f"step {step}", lambda: last_step(run_dir) >= step, timeout)

    def wait_for_handlers(self, nproc: int, timeout: float = 300) -> dict:
        """Until every rank has its SIGUSR1/SIGTERM handlers installed (SigCgt in /proc)."""
        def ready():
            r = self.ranks()
            return len(r) == nproc and all(catches(p.pid, signal.SIGUSR1) for p in r.values())
        self.wait_for("the ranks' signal handlers", ready, timeout)
        return self.ranks()

    def finish(self, timeout: float = 600) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"run did not end within {timeout} s:\n{self.text()[-4000:]}")
        return self.proc.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in self.ranks().values():   # ranks that left the group (orphans)
            p.kill()
        self.proc.wait()

    def text(self) -> str:
        self.out.flush()
        return Path(self.out.name).read_text(errors="replace")


def catches(pid: int, sig: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(mask >> (sig - 1) & 1)


def last_step(run_dir: Path) -> int:
    try:
        with open(run_dir / "metrics.jsonl") as f:
            steps = [json.loads(line).get("step", 0) for line in f if '"train/loss"' in line]
    except (OSError, json.JSONDecodeError):
        return 0
    return max(steps, default=0)


def first_error_line(text: str) -> str:
    """The first line of the output that reports an error: what a user reads first. A traceback's
    frames (indented after an optional "[rankN]:" prefix) are skipped: their source lines may name a
    variable called error, but the message that ends the traceback is what reports it."""
    for line in text.splitlines():
        body = re.sub(r"^\[rank\d+\]: ?", "", line)
        if body.startswith((" ", "\t")):
            continue
        if re.search(r"\berror\b", line, re.I) and "UserWarning" not in line:
            return line
    return ""


def complete_steps(run_dir: Path) -> list:
    """Steps of the checkpoints with a COMPLETE marker/manifest."""
    root = run_dir / "checkpoints"
    return sorted(int(d.name.split("_")[1]) for d in root.glob("step_*") if (d / "COMPLETE").exists())
