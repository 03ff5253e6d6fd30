"""Run a function on N real processes with a real gloo process group (no mocks).

`run_distributed(fn, world_size, *args)` spawns the processes, calls fn(rank, world_size, *args)
in each after init_process_group, and returns the list of what each rank returned (pickled back
through a queue). An exception on any rank fails the test with that rank's traceback.
"""
from __future__ import annotations

import io
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.launch import free_port  # noqa: F401 (the one free_port; importable from here too)


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        # bytes, not tensors: shared-memory tensor handles die with the worker process
        buf = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get()
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=timeout)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
