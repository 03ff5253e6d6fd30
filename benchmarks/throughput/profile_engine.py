"""The trainer's engine in `--nproc` processes started here (gloo): its own set-up
(trainer.session.setup: DeepSpeed engine, ZeRO, optimizer, loader) and its own optimizer step
(trainer.loop.train_step, with the step statistics and the expert-bias update), one micro-batch of
the per-rank shape per step. Forward, backward and engine.step are timed apart by a wrapper
around the engine that the step calls through; then rank 0's hottest operators of 3 steps."""
from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
import time

from benchmarks.common import RunMonitor, format_table, free_port
from benchmarks.throughput.presets import load_run_config

PHASES = ("forward", "backward", "engine.step")


class PhaseTimedEngine:
    """The DeepSpeed engine, with the seconds of each forward, backward and step recorded (after a
    device sync on a GPU, so that each phase's kernels are billed to it). Everything else goes to
    the engine itself."""

    def __init__(self, engine, device):
        self._engine, self._device = engine, device
        self.seconds = {p: 0.0 for p in PHASES}

    def _timed(self, phase: str, fn, *args, **kwargs):
        from benchmarks.common import sync
        sync(self._device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync(self._device)
        self.seconds[phase] += time.perf_counter() - t0
        return out

    def __call__(self, *args, **kwargs):
        return self._timed("forward", self._engine, *args, **kwargs)

    def backward(self, loss):
        return self._timed("backward", self._engine.backward, loss)

    def step(self):
        return self._timed("engine.step", self._engine.step)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def profile_engine(args, impls) -> list[dict]:
    import torch.multiprocessing as mp
    queue = mp.get_context("spawn").SimpleQueue()
    monitor = RunMonitor(os.getpid())   # other processes' CPU, per timed segment below
    monitor.start()
    try:
        mp.start_processes(_engine_rank, args=(args.nproc, free_port(), args, impls, queue), nprocs=args.nproc,
                           start_method="spawn")
    finally:
        monitor.stop()
    got = [queue.get() for _ in range(args.nproc)]
    by_rank = {r: (rows, tables) for r, rows, tables in got}
    rows, tables = by_rank[0]
    for i, row in enumerate(rows):
        totals = [by_rank[r][0][i]["total_ms"] for r in by_rank]
        row["rank_spread_ms"] = max(totals) - min(totals)
        row["foreign_cores"] = monitor.foreign_between(*row.pop("span"))
        for r in by_rank:
            by_rank[r][0][i].pop("span", None)
    print(f"\nthe trainer's engine and train_step in {args.nproc} process(es) started here ({args.ds_config}, gloo, "
          f"{args.threads} thread(s) each), micro-batch {rows[0]['micro_batch']} x {rows[0]['seq_len']} per rank "
          f"per step: rank 0's median of {args.profile_repeat} steps")
    print(format_table(rows, [("impl", "impl", "s"), ("forward_ms", "forward ms", ".1f"),
                              ("backward_ms", "backward ms", ".1f"), ("engine.step_ms", "engine.step ms", ".1f"),
                              ("other_ms", "rest ms", ".1f"), ("total_ms", "train_step ms", ".1f"),
                              ("rank_spread_ms", "rank spread ms", ".1f"), ("params_M", "params M", ".2f"),
                              ("foreign_cores", "other cores", ".2f")]))
    print("backward includes ZeRO's gradient hooks (bucketing, reduce-scatter); engine.step the gradient norm, "
          "clipping, AdamW on this rank's partition and the all-gather of updated parameters; rest = the step "
          "statistics, the expert-bias update, noise and the loader")
    for impl, table in tables.items():
        print(f"\n{impl}, rank 0: hottest operators of 3 whole steps (forward, backward, engine.step), self CPU time")
        print(table)
    return rows


def _engine_rank(rank: int, world: int, port: int, args, impls, queue) -> None:
    import logging

    import torch.distributed as dist

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    import torch
    torch.set_num_threads(args.threads)
    rows, tables = [], {}
    base = [tempfile.mkdtemp(prefix="train_throughput_profile_") if rank == 0 else None]
    dist.broadcast_object_list(base, src=0)
    base = base[0]
    try:
        for impl in impls:
            row, table = _profile_impl(args, impl, os.path.join(base, impl), rank, world)
            rows.append(row)
            if table is not None:
                tables[impl] = table
            dist.barrier()
    finally:
        if rank == 0:
            shutil.rmtree(base, ignore_errors=True)
    queue.put((rank, rows, tables))
    dist.destroy_process_group()


def trainers_step(s):
    """step -> None: trainer.loop.train_step on session `s`, with the collaborators the loop
    builds for it (step statistics, the expert-bias owner, the non-finite step guard)."""
    from trainer.distributed import comm_device
    from trainer.engine.nonfinite import StepGuard
    from trainer.expert_bias import ExpertBiasBalancer
    from trainer.loop import train_step
    from trainer.preemption import PreemptionWatcher
    from trainer.step_stats import StepStats

    stats = StepStats(len(s.model.moe_layers()), s.cfg.moe.num_experts)
    bias = ExpertBiasBalancer(s.model, s.device, comm_device())
    guard = StepGuard(s.engine, PreemptionWatcher.local_flags)   # no signal handlers: only the flags
    return lambda step: train_step(s, step, stats, bias, guard)


def _profile_impl(args, impl: str, run_dir: str, rank: int, world: int):
    import logging

    import torch
    import torch.distributed as dist
    from trainer.session import setup

    cfg = load_run_config(args, impl, run_dir)
    t = cfg.train
    per_rank = t.global_batch_size // world
    t.global_batch_size, t.micro_batch_size = per_rank * world, per_rank   # no accumulation
    s = setup(cfg, args.ds_config)
    logging.getLogger("ecdlm").setLevel(logging.WARNING)
    timed = PhaseTimedEngine(s.engine, s.device)
    train_step = trainers_step(dataclasses.replace(s, engine=timed))   # calling through the timer
    samples = {p: [] for p in (*PHASES, "total")}

    def step(i: int, record: bool) -> None:
        before = dict(timed.seconds)
        t0 = time.perf_counter()
        train_step(i)
        total = time.perf_counter() - t0
        if record:
            for p in PHASES:
                samples[p].append(timed.seconds[p] - before[p])
            samples["total"].append(total)

    for i in range(args.profile_warmup + 2):
        step(i, False)
    dist.barrier()
    start = time.perf_counter()
    for i in range(args.profile_repeat):
        step(100 + i, True)
    span = (start, time.perf_counter())
    table = None
    if rank == 0:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    record_shapes=args.profile_shapes) as prof:
            for i in range(3):
                step(200 + i, False)
        table = prof.key_averages(group_by_input_shape=args.profile_shapes).table(
            sort_by="self_cpu_time_total", row_limit=args.profile_ops, max_name_column_width=48,
            max_shapes_column_width=80)
    else:
        for i in range(3):
            step(200 + i, False)
    s.loader.close()
    med = {p: statistics.median(v) * 1e3 for p, v in samples.items()}
    row = {"impl": impl, **{f"{p}_ms": med[p] for p in PHASES}, "total_ms": med["total"],
           "other_ms": med["total"] - sum(med[p] for p in PHASES), "span": span, "micro_batch": per_rank,
           "seq_len": t.seq_len, "params_M": sum(p.numel() for p in s.model.parameters()) / 1e6}
    return row, table
