"""Start the trainer as other processes: the one way tests, benchmarks and the reproduction do it.

Two launchers, one command line for the trainer itself (`ENTRY` plus its arguments):
- "deepspeed": the venv's `deepspeed --num_gpus N` runner, which starts `deepspeed.launcher.launch`,
  which starts the ranks. What a user types; about 20 s of CPU per run before the ranks start.
- "env": the N ranks started directly, each with the env:// variables a launcher would set
  (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as under srun or mpirun.

Either way each started process leads a process group of its own (a new session, so that a signal to
the caller's terminal group does not reach it), and `kill()` ends every group: the launcher and its
ranks, or each rank and whatever it started. A timed-out run never trains on behind its caller.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Union

ENTRY = "train.py"   # the training entry point, relative to ROOT: the one place that names it
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCHERS = ("deepspeed", "env")
# a rank that failed: the others get this long to report their own error before the group is killed
# (DeepSpeed's launch.py polls its ranks once a second and kills the rest on the first failure)
FAIL_GRACE_S = 10.0


def free_port() -> int:
    """A TCP port free on this host now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_args(overrides=(), config: str = "configs/tiny.yaml", ds_config: Optional[str] = "ds_configs/zero2.json",
                 script: str = ENTRY) -> list:
    """The trainer's own command line (script first), as every launcher runs it."""
    ds = ["--ds_config", str(ds_config)] if ds_config else []
    return [str(script), *ds, "--config", str(config), *[str(o) for o in overrides]]


def deepspeed_command(nproc: int, args: list, port: Optional[int] = None) -> list:
    """`deepspeed --num_gpus N --master_port P <script> <args>`, the venv's runner."""
    return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port or free_port()), *args]


def rank_env(rank: int, world_size: int, port: int, addr: str = "127.0.0.1") -> dict:
    """The env:// variables one rank reads (one host: LOCAL_RANK is RANK)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": addr, "MASTER_PORT": str(port)}


class Launch:
    """A started run: the launcher process, or the ranks themselves, each leading a process group.

    Output (stdout and stderr of every process) goes to one file, `log`, in the order written."""

    def __init__(self, procs: list, log: str, cmd: list, launcher: str):
        self.procs, self.log, self.cmd, self.launcher = procs, log, cmd, launcher
        self._failed_at: Optional[float] = None
        self._first_failure: Optional[int] = None   # the status of the rank seen failing first

    @property
    def pid(self) -> int:
        """The group leader: the `deepspeed` runner, or rank 0."""
        return self.procs[0].pid

    @property
    def proc(self) -> subprocess.Popen:
        return self.procs[0]

    @property
    def returncode(self) -> Optional[int]:
        """None while running; else the launcher's status, or that of the rank seen failing first
        (0 if none failed)."""
        codes = [p.returncode for p in self.procs]
        if any(c is None for c in codes):
            return None
        if self._first_failure is not None:
            return self._first_failure
        return next((c for c in codes if c != 0), 0)

    def poll(self) -> Optional[int]:
        """Like Popen.poll; under "env", a failed rank ends the run (as launch.py would end it)
        once the others have had FAIL_GRACE_S to say what they saw."""
        codes = [p.poll() for p in self.procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed and self._first_failure is None:
            self._first_failure = failed[0]
        if len(self.procs) > 1 and failed and any(c is None for c in codes):
            self._failed_at = self._failed_at or time.monotonic()
            if time.monotonic() - self._failed_at > FAIL_GRACE_S:
                self.kill()
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        """The status (see returncode); on timeout, kills the group and raises TimeoutExpired."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                self.kill()
                raise subprocess.TimeoutExpired(self.cmd, timeout)
            time.sleep(0.2)
        return self.returncode

    def communicate(self, timeout: Optional[float] = None) -> tuple:
        """(output, None) once the run ends; Popen's shape, for callers written against one."""
        self.wait(timeout)
        return self.text(), None

    def send_signal(self, sig: int) -> None:
        """To the group leader only (what a user's kill does)."""
        self.procs[0].send_signal(sig)

    def kill(self) -> None:
        """SIGKILL to every group (the launcher's and its ranks', or each rank's), then reap."""
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def text(self) -> str:
        return Path(self.log).read_text(errors="replace")


def start(nproc: int, args: list, launcher: str = "env", env: Optional[dict] = None,
          log: Union[str, os.PathLike, None] = None, cwd: Union[str, os.PathLike] = ROOT,
          python: str = sys.executable) -> Launch:
    """Start `args` (trainer_args(...): the script and its arguments) on `nproc` ranks.

    env: added to this process's environment (a None value removes the variable); log: the output file (a new temporary file if None,
    appended to if it exists)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    if nproc < 1:
        raise ValueError(f"nproc={nproc}: expected at least 1 process")
    base = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    if log is None:
        fd, log = tempfile.mkstemp(prefix="run_", suffix=".log")
        os.close(fd)
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    out = open(log, "a")
    procs = []
    try:
        if launcher == "deepspeed":
            cmd = deepspeed_command(nproc, args)
            procs.append(subprocess.Popen(cmd, cwd=cwd, env=base, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        else:
            port, cmd = free_port(), [python, *args]
            for rank in range(nproc):   # each rank leads a session of its own (kill() ends each group)
                procs.append(subprocess.Popen(cmd, cwd=cwd, env={**base, **rank_env(rank, nproc, port)},
                                              stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    except BaseException:
        Launch(procs, str(log), [], launcher).kill()
        raise
    finally:
        out.close()   # the children hold their own descriptors
    return Launch(procs, str(log), cmd, launcher)


def run(nproc: int, args: list, timeout: float, **kw) -> Launch:
    """start(), then wait up to `timeout` s (the group is killed on timeout: TimeoutExpired)."""
    launch = start(nproc, args, **kw)
    launch.wait(timeout)
    return launch


def run_killing_group(cmd: list, timeout: float, env: dict, cwd: Union[str, os.PathLike] = ROOT
                      ) -> subprocess.CompletedProcess:
    """subprocess.run of any command (mpiexec, a CLI), except that a timeout kills its whole process
    group: killing only the top process would leave its children running."""
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)
