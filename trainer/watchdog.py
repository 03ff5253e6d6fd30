"""Hang watchdog: a rank that sees no progress within its budget dumps every thread's Python stack,
naming rank and host, and exits with EXIT_HANG (88), which the SLURM script requeues.

A rank that is stopped or lost leaves the others waiting inside a collective, where no Python
code of the main thread runs. A daemon thread keeps the time instead: the collective releases
the GIL while it waits, so the thread can dump the stacks (faulthandler, all threads) to stderr,
which is the job's log, and to <run_dir>/watchdog/rank<R>.txt, then end the process with
os._exit: a clean exit would wait on the stuck collective. The budget is train.setup_timeout_s
until the first step completes (rendezvous, engine, resume, first step), then
train.hang_timeout_s between completed steps and saves.

If the main thread holds the GIL while stuck (a C call that never releases it), no Python thread
can run; faulthandler's own C timer, armed 60 s later, then dumps the stacks and exits with 1.
"""
from __future__ import annotations

import faulthandler
import os
import socket
import sys
import threading
import time
from typing import Optional

from .preemption import EXIT_HANG

C_TIMER_GRACE_S = 60.0


class Watchdog:
    def __init__(self, run_dir: str, setup_s: float, step_s: float):
        self.run_dir, self.setup_s, self.step_s = run_dir, setup_s, step_s
        self.budget = setup_s
        self.deadline = time.monotonic() + setup_s
        self.beats = 0
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ecdlm-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._arm_c_timer()
        self._thread.start()
        return self

    def beat(self) -> None:
        """Progress: a step or a save completed. The next budget is train.hang_timeout_s."""
        self.beats += 1
        self.budget = self.step_s
        self.deadline = time.monotonic() + self.step_s
        self._arm_c_timer()

    def stop(self) -> None:
        self.deadline = None
        faulthandler.cancel_dump_traceback_later()
        self._wake.set()

    def _arm_c_timer(self) -> None:
        faulthandler.dump_traceback_later(self.budget + C_TIMER_GRACE_S, exit=True, file=sys.stderr)

    def _watch(self) -> None:
        while self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self._fire()
            self._wake.wait(min(left, 5.0))

    def _fire(self) -> None:
        rank = next((os.environ[k] for k in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK") if k in os.environ), "?")
        host = socket.gethostname()
        what = "the first step" if self.beats == 0 else "a step"
        key = "train.setup_timeout_s" if self.beats == 0 else "train.hang_timeout_s"
        header = (f"error: watchdog: rank {rank} on {host} (pid {os.getpid()}) saw no progress for "
                  f"{self.budget:g} s waiting for {what} ({key}); a rank is stopped, lost or stuck. "
                  f"Python stacks of this rank follow; exiting with {EXIT_HANG} (requeue)\n")
        sys.stderr.write(header)
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        try:
            folder = os.path.join(self.run_dir, "watchdog")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"rank{rank}.txt"), "a") as f:
                f.write(header)
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as err:
            sys.stderr.write(f"watchdog: could not write the stack file ({err})\n")
        sys.stderr.flush()
        os._exit(EXIT_HANG)


_current: Optional[Watchdog] = None


def start(run_dir: str, setup_s: float, step_s: float) -> Optional[Watchdog]:
    """The process's watchdog (train.hang_timeout_s=0: none)."""
    global _current
    if step_s <= 0:
        return None
    _current = Watchdog(run_dir, setup_s, step_s).start()
    return _current


def beat() -> None:
    if _current is not None:
        _current.beat()


def stop() -> None:
    if _current is not None:
        _current.stop()
