"""Preemption: SIGUSR1 (SLURM's warning before the time limit, or `scancel --signal=USR1`) and
SIGTERM make the trainer finish the current optimizer step, save a checkpoint and exit with a
status the SLURM script understands:

    EXIT_REQUEUE (85)  after SIGUSR1: checkpointed, please requeue this job
    EXIT_STOPPED (86)  after SIGTERM: checkpointed, stop cleanly
    EXIT_DIVERGED (87) a non-finite loss or gradient norm (train.nonfinite): stopped without
                       saving, the newest checkpoint is from before; do not requeue
    EXIT_HANG (88)     no step completed within the watchdog's budget (trainer/watchdog.py):
                       stacks dumped, please requeue

The handlers are installed first thing in train.py (`install_handlers`), so a signal
during set-up or resume is kept and acted on after the first step, not fatal. Ranks may receive
the signal at different times (or only some of them), so the flags are MAX-reduced once per
step, inside the step's non-finite check (trainer/engine/nonfinite.py) when the optimizer has
one, else here: all ranks stop after the same step.
"""
from __future__ import annotations

import logging
import signal

EXIT_REQUEUE = 85
EXIT_STOPPED = 86
EXIT_DIVERGED = 87
EXIT_HANG = 88
_CODES = {signal.SIGUSR1: EXIT_REQUEUE, signal.SIGTERM: EXIT_STOPPED}
_SEEN = {EXIT_REQUEUE: False, EXIT_STOPPED: False}   # this process's signals so far
log = logging.getLogger("ecdlm")


def _handle(signum, frame) -> None:
    _SEEN[_CODES[signum]] = True


def install_handlers() -> None:
    """Idempotent. Called before anything slow, so no signal finds the default (fatal) action."""
    for sig in _CODES:
        signal.signal(sig, _handle)


def note_stop() -> None:
    """As if SIGTERM had arrived (the launcher above this rank went away: trainer/launcher_watch.py)."""
    _SEEN[EXIT_STOPPED] = True


class PreemptionWatcher:
    def __init__(self):
        install_handlers()

    @staticmethod
    def local_flags() -> list:
        """This rank's [SIGUSR1 seen, SIGTERM seen], for a collective that agrees on them."""
        return [int(_SEEN[EXIT_REQUEUE]), int(_SEEN[EXIT_STOPPED])]

    def agreed_exit_code(self, agreed: list = None) -> int:
        """0 to keep going, else the exit code every rank uses. `agreed`: the flags already
        MAX-reduced this step (the step's non-finite check carries them); without it, a collective
        here. Requeue beats stop, so SLURM's USR1 warning followed by its TERM still requeues."""
        if agreed is None:
            import torch   # here, so that train.py can install the handlers before torch loads
            import torch.distributed as dist

            from .distributed import comm_device
            flags = torch.tensor(self.local_flags(), dtype=torch.int64)
            if dist.is_initialized() and dist.get_world_size() > 1:
                flags = flags.to(comm_device())
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            agreed = flags.tolist()
        requeue, stop = agreed
        return EXIT_REQUEUE if requeue else EXIT_STOPPED if stop else 0
