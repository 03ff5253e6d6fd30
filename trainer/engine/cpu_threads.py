"""Intra-op CPU threads per rank: the host's cores shared among the ranks running on it.

torch gives every process as many intra-op threads as the host has cores. With N ranks on one host
that is N times too many: they preempt one another, and a rank descheduled inside a collective holds
up every other rank (measured on the 2-core CI machine: the 2-rank token-choice exact-resume test
took 71 s at 2 threads per rank, 27 s at 1). The DeepSpeed launcher sets no thread count unless told
to bind cores, and plain env:// ranks (srun, mpirun, tests) none either, so the trainer sets its own:
cores // ranks on this host, at least 1. An OMP_NUM_THREADS set by the user (slurm/env.sh sets it
from --cpus-per-task) is theirs and is kept."""
from __future__ import annotations

import os
import socket
from typing import Optional

import torch
import torch.distributed as dist

LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")   # torchrun's; DeepSpeed's launch.py's


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: a SLURM step or taskset may narrow it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def ranks_on_this_host() -> int:
    """From the launcher's variable if it set one, else by comparing host names over the world
    group (one all_gather at start-up)."""
    for name in LOCAL_SIZE_VARS:
        if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 0:
            return int(os.environ[name])
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 1
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, socket.gethostname())
    return names.count(socket.gethostname())


def threads_per_rank(cores: int, local_ranks: int) -> int:
    return max(1, cores // max(1, local_ranks))


def share_cpu_threads() -> Optional[str]:
    """Set this rank's intra-op threads; returns the line to log (None when OMP_NUM_THREADS rules).

    Collective when no launcher variable names the local size: every rank calls it."""
    local = ranks_on_this_host()   # every rank joins the gather, whatever it then decides
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = usable_cores()
    threads = threads_per_rank(cores, local)
    torch.set_num_threads(threads)
    return (f"CPU threads per rank: {threads} ({cores} cores shared by {local} ranks on this host; "
            f"OMP_NUM_THREADS overrides)")
