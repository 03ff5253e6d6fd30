"""A rank started by the `deepspeed` launcher stops cleanly when that launcher goes away.

`deepspeed` (deepspeed/launcher/runner.py) starts `python -m deepspeed.launcher.launch`, which
starts the ranks. On one node the runner installs no signal handler: a SIGTERM to it (the process
a user or a scheduler sees) kills it alone, and launch.py and the ranks train on as orphans.
launch.py itself, on SIGTERM, forwards SIGTERM to the ranks, SIGKILLs them 30 s later whatever
they are doing, and exits 1 (sigkill_handler), so the documented 86 cannot come through it.

Nothing outside DeepSpeed can change those two, so each rank watches its launcher: when
launch.py's parent (the runner) or launch.py itself is gone, the rank acts as if SIGTERM had
arrived: it finishes the step, checkpoints with the others and exits 86. The command that keeps
86 visible is to signal the ranks instead (docs/operations.md, "Faults and exit statuses").
"""
from __future__ import annotations

import os
import threading

POLL_S = 1.0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    """Parent pid of `pid` from /proc (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def watch_deepspeed_launcher(on_gone) -> bool:
    """Start watching when our parent is DeepSpeed's launch.py; True if it is."""
    launch_pid = os.getppid()
    if "deepspeed.launcher.launch" not in _cmdline(launch_pid):
        return False
    runner_pid = _ppid(launch_pid)
    runner_is_deepspeed = "deepspeed" in _cmdline(runner_pid)

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(POLL_S):
            gone = os.getppid() != launch_pid or (runner_is_deepspeed and _ppid(launch_pid) != runner_pid)
            if gone:
                on_gone()
                return

    threading.Thread(target=watch, name="ecdlm-launcher-watch", daemon=True).start()
    return True
