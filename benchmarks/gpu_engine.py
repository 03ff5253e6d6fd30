"""The training step through the real DeepSpeed engine on one device, only where DeepSpeed imports:
trainer/engine/build.py's engine (ZeRO-2 from ds_configs/zero2.json, fp32 master weights and
AdamW moments, bf16 compute on a GPU), the objective the trainer wraps, engine.backward and
engine.step, exactly as trainer/loop.py calls them.

Same presets, shapes and random inputs as benchmarks/gpu_step.py (which leaves DeepSpeed out), so
the two rows per preset show what the engine adds. A one-rank env:// process group is created
here; its address is the loopback, so no network is needed.
"""
from __future__ import annotations

import os
import socket
import statistics
import time

import torch

from benchmarks.gpu_setup import ROOT, step_config, sync
from benchmarks.gpu_step import batches


def one_rank_group(device) -> None:
    """A process group of one (NCCL on a GPU, gloo on the CPU), as the launcher would set it up."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    with socket.socket() as s:   # a free loopback port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT") or str(port))
    from trainer.engine.parallel import init_distributed
    init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def run_config(name: str, smoke: bool, bf16: bool):
    """The RunConfig the trainer would build for this preset at one rank, micro-batch = global batch."""
    from rundir.config import RunConfig, TrainConfig
    mc, B, L = step_config(name, smoke)
    train = TrainConfig(global_batch_size=B, micro_batch_size=B, seq_len=L, precision="bf16" if bf16 else "fp32")
    return RunConfig(model_config=mc, train=train), B, L


def run_one(name: str, device, warmup: int, repeat: int, smoke: bool, peaks: dict) -> dict:
    from trainer.engine.build import build_engine
    from trainer.engine.ds_config import load_ds_config, resolve_ds_config
    from trainer.flops import train_flops
    bf16 = device.type == "cuda"
    cfg, B, L = run_config(name, smoke, bf16)
    src = str(ROOT / "ds_configs" / "zero2.json")
    ds = resolve_ds_config(load_ds_config(src), cfg, 1, bf16=bf16, has_moe=True, src=src)
    built = build_engine(cfg, ds)
    engine = built.engine
    data = batches(cfg.model_config, B, L, device)

    def step(batch) -> torch.Tensor:
        fwd = engine(*batch)["forward"]
        engine.backward(fwd.loss)
        engine.step()
        assignments = sum((s.assignments for s in fwd.output.moe), torch.zeros((), device=fwd.loss.device))
        return torch.stack([fwd.diffusion.mask_BL.sum().float(), assignments.float()])

    for i in range(warmup):
        step(data[i % len(data)])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, counts = [], []
    for i in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        counts.append(step(data[i % len(data)]))
        sync(device)
        times.append(time.perf_counter() - t0)
    flops = [train_flops(cfg.model_config, B * L, L, masked, assigned)
             for masked, assigned in torch.stack(counts).tolist()]
    sec = statistics.median(times)
    tflops = statistics.median(f / t for f, t in zip(flops, times)) / 1e12
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    row = {"config": name, "engine": "deepspeed", "B": B, "L": L,
           "params_B": sum(p.numel() for p in built.model.parameters()) / 1e9, "ms": sec * 1e3,
           "times_ms": [t * 1e3 for t in times], "tokens_per_s": B * L / sec, "tflop_per_s": tflops,
           "mfu_datasheet": tflops / peaks["datasheet"] if peaks.get("datasheet") else None,
           "peak_mem_gb": peak / 2**30 if peak else None, "zero_stage": ds["zero_optimization"]["stage"],
           "precision": "bf16 compute, fp32 masters" if bf16 else "fp32"}
    del engine, built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(ctx, sink, configs=("owt_ec", "owt_tc")) -> None:
    """Each preset on its own: one that raises or runs out of memory is its row's error."""
    from benchmarks.gpu_guard import clean_up, guarded
    one_rank_group(ctx.device)
    warmup, repeat = (1, 2) if ctx.smoke else (2, 5)
    for name in configs:
        guarded(sink, {"config": name, "engine": "deepspeed"},
                lambda: run_one(name, ctx.device, warmup, repeat, ctx.smoke, ctx.peaks), ctx.device)
        clean_up(ctx.device)
