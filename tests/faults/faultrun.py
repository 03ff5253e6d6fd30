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

from trainer.launch import ENTRY, ROOT, Launch, start, trainer_args

# the tiny preset, small and short: 2 CPU cores are shared by everything
FAULT_OVERRIDES = {"train.log_every": 1, "wandb.mode": "disabled", "eval.batches": 1, "eval.batch_size": 4,
                   "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.seq_len": 64,
                   "model.vocab_size": 1024, "train.eval_every": 1000}


def overrides(data: Path, run_dir: Path, **extra) -> list:
    base = {"data.path": str(data), "train.output_dir": str(run_dir), **FAULT_OVERRIDES, **extra}
    return [f"{k}={v}" for k, v in base.items()]


class Run:
    """A started run (trainer/launch.py's Launch: its own session, output to one file) that a
    test can attack: `Run.deepspeed` through the `deepspeed` runner, `Run.env` as plain env:// ranks,
    or `Run(cmd)` for any other launcher command (mpiexec)."""

    def __init__(self, cmd: list = None, env: dict = None, launch: Launch = None):
        if launch is None:
            fd, log = tempfile.mkstemp(prefix="fault_", suffix=".log")
            with os.fdopen(fd, "w") as out:
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, **(env or {})}, start_new_session=True)
            launch = Launch([proc], log, cmd, "command")
        self.launch, self.proc = launch, launch.proc

    @classmethod
    def deepspeed(cls, nproc: int, args: list, ds_config: str = "ds_configs/zero2.json", env: dict = None):
        return cls(launch=start(nproc, trainer_args(args, ds_config=ds_config), launcher="deepspeed", env=env))

    @classmethod
    def env(cls, nproc: int, args: list, ds_config: str = "ds_configs/zero2.json", env: dict = None):
        return cls(launch=start(nproc, trainer_args(args, ds_config=ds_config), launcher="env", env=env))

    def ranks(self) -> dict:
        """{rank: psutil.Process} of the trainer processes of this run (the started processes
        themselves under env://, a launcher's descendants otherwise)."""
        out = {}
        procs = []
        for p in self.launch.procs:
            try:
                top = psutil.Process(p.pid)
                procs += [top, *top.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for p in procs:
            try:
                if any(part.endswith(ENTRY) for part in p.cmdline()):
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
            if self.launch.poll() is not None:
                raise AssertionError(f"run ended ({self.launch.returncode}) before {what}:\n{self.text()[-4000:]}")
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
            return self.launch.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"run did not end within {timeout} s:\n{self.text()[-4000:]}") from None

    def kill(self) -> None:
        ranks = self.ranks()
        self.launch.kill()
        for p in ranks.values():   # ranks that left the group (orphans)
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def text(self) -> str:
        return self.launch.text()


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
