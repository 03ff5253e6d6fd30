"""Preemption: SIGUSR1 (SLURM's warning before the time limit, or `scancel --signal=USR1`) and
SIGTERM make the trainer finish the current optimizer step, save a checkpoint and exit with a
status the SLURM script understands:

    EXIT_REQUEUE (85)  after SIGUSR1: checkpointed, please requeue this job
    EXIT_STOPPED (86)  after SIGTERM: checkpointed, stop cleanly

Ranks may receive the signal at different times (or only some of them), so the flag is
all-reduced (MAX) after every step: all ranks stop after the same step.
"""
from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

from .distributed import comm_device

EXIT_REQUEUE = 85
EXIT_STOPPED = 86
_CODES = {signal.SIGUSR1: EXIT_REQUEUE, signal.SIGTERM: EXIT_STOPPED}
log = logging.getLogger("ecdlm")


class PreemptionWatcher:
    def __init__(self):
        self.seen = {EXIT_REQUEUE: False, EXIT_STOPPED: False}
        for sig in _CODES:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.seen[_CODES[signum]] = True

    def agreed_exit_code(self) -> int:
        """Collective: 0 to keep going, else the exit code every rank uses. Requeue beats stop,
        so SLURM's USR1 warning followed by its TERM still requeues."""
        flags = torch.tensor([self.seen[EXIT_REQUEUE], self.seen[EXIT_STOPPED]], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = flags.to(comm_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        requeue, stop = flags.tolist()
        return EXIT_REQUEUE if requeue else EXIT_STOPPED if stop else 0
