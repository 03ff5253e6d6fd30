"""A whole training step on one device, without DeepSpeed: forward_loss, backward, fused AdamW.

Precision is the trainer's bf16 layout minus ZeRO's fp32 master copy: parameters, gradients and
AdamW's moments all bf16 (owt_ec has 4.8B parameters on one GPU; fp32 master weights and moments
would take 77 GB before the first activation). TFLOP/s come from trainer/flops.py with the
capacity actually used (routed assignments and masked positions read back after the timing);
MFU is over the datasheet bf16 peak and over the matmul rate measured in the same run.

Host syncs per step: on CUDA, `torch.cuda.set_sync_debug_mode('warn')` counts what the driver
really waited for, over one extra step; benchmarks/host_syncs.py's counter runs over one more on
any device (on the CPU it is the only one). SDPA's kernel is read off the profiler.
"""
from __future__ import annotations

import statistics
import time
import warnings

import torch

from benchmarks.gpu_setup import STEP_CONFIGS, device_model, step_config, sync


def batches(cfg, B: int, L: int, device, n: int = 3, seed: int = 0) -> list[tuple]:
    """n (tokens, u, token_u) batches of random tokens (a lent GPU has no corpus): rotated, so no
    step reuses its predecessor's inputs."""
    from model.diffusion import stratified_u
    g = torch.Generator().manual_seed(seed)
    V = cfg.model.vocab_size
    return [(torch.randint(4, V, (B, L), generator=g).to(device), stratified_u(B, g).to(device),
             torch.rand(B, L, generator=g).to(device)) for _ in range(n)]


def parts(result) -> tuple:
    """(loss, DiffusionLoss, ModelOutput) of forward_loss: a TrainingForward now, a tuple before."""
    if hasattr(result, "loss"):
        return result.loss, result.diffusion, result.output
    return tuple(result)


def train_step(model, opt, batch) -> torch.Tensor:
    """One step; returns [masked positions, routed assignments] as a device tensor (read later:
    keeping the whole record would hold every step's logits)."""
    from model import forward_loss
    tokens, u, token_u = batch
    loss, rec, out = parts(forward_loss(model, tokens, u, token_u))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assignments = sum((s.assignments for s in out.moe), torch.zeros((), device=loss.device))
    return torch.stack([rec.mask_BL.sum().float(), assignments.float()])


def cuda_sync_count(fn) -> int:
    """Synchronizing CUDA calls made by fn(), as the sync debug mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def sdpa_kernels(model, batch, device) -> list[str]:
    """Names of the attention operators and kernels one forward ran (flash, efficient, math...)."""
    from torch.profiler import ProfilerActivity, profile

    from model import forward_loss
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        forward_loss(model, *batch)
        sync(device)
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(w in n.lower() for w in ("flash", "attention", "fmha", "sdpa")))


def measure(model, opt, data, device, warmup: int, repeat: int, step=None) -> tuple[list, list]:
    """(seconds, [masked, assignments] device tensors) of `repeat` timed steps after `warmup`."""
    step = step or (lambda batch: train_step(model, opt, batch))
    for i in range(warmup):
        step(data[i % len(data)])
    sync(device)
    times, counts = [], []
    for i in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        counts.append(step(data[i % len(data)]))
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, counts


def rates(cfg, B: int, L: int, times: list, counts: list, peaks: dict, prefix: str = "") -> dict:
    """ms, tokens/s, TFLOP/s from the capacity used (trainer/flops.py) and MFU of timed steps."""
    from trainer.flops import train_flops
    flops = [train_flops(cfg, B * L, L, masked, assignments) for masked, assignments in torch.stack(counts).tolist()]
    sec = statistics.median(times)
    tflops = statistics.median(f / t for f, t in zip(flops, times)) / 1e12
    return {f"{prefix}ms": sec * 1e3, f"{prefix}min_ms": min(times) * 1e3,
            f"{prefix}times_ms": [t * 1e3 for t in times],
            f"{prefix}tokens_per_s": B * L / sec, f"{prefix}tflop_per_step": statistics.median(flops) / 1e12,
            f"{prefix}tflop_per_s": tflops,
            f"{prefix}mfu_datasheet": tflops / peaks["datasheet"] if peaks.get("datasheet") else None,
            f"{prefix}mfu_measured": tflops / peaks["matmul"] if peaks.get("matmul") else None}


def run_one(name: str, ctx, sink) -> dict:
    """The timed row is written first; its diagnostics (syncs, kernels) are added to it after,
    each on its own, so a failing profiler costs only its own field."""
    from benchmarks.gpu_guard import error_fields
    from benchmarks.host_syncs import HostSyncCounter
    from model import forward_loss
    device, dtype = ctx.device, ctx.dtype
    cfg, B, L = step_config(name, ctx.smoke)
    model = device_model(cfg, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    data = batches(cfg, B, L, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, counts = measure(model, opt, data, device, ctx.step_warmup, ctx.step_repeat)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    row = sink.add({"config": name, "B": B, "L": L, "params_B": n_params / 1e9,
                    **rates(cfg, B, L, times, counts, ctx.peaks),
                    "peak_mem_gb": peak / 2**30 if peak else None, "dtype": str(dtype).removeprefix("torch."),
                    "optimizer": "AdamW, fused" if device.type == "cuda" else "AdamW (foreach)",
                    "moe_layers": len(model.moe_layers())})

    def diagnose(field, fn):
        try:
            row.update(fn())
        except Exception as err:   # this diagnostic, not the row
            row[field + "_error"] = error_fields(err)["error"]
        sink.save()

    if device.type == "cuda":
        diagnose("cuda_syncs",
                 lambda: {"cuda_syncs_per_step": cuda_sync_count(lambda: train_step(model, opt, data[0]))})

    def host_syncs():
        with HostSyncCounter() as sc:   # forward and backward: the optimizer's CPU step counters are no sync
            parts(forward_loss(model, *data[1]))[0].backward()
        opt.zero_grad(set_to_none=True)
        return {"counted_syncs_per_step": sc.total, "counted_syncs_in_moe_layers": sc.count("model/moe/"),
                "sync_sites": sc.by_site()}
    diagnose("counted_syncs", host_syncs)

    def kernels():
        names = sdpa_kernels(model, data[2], device)
        return {"sdpa_kernels": names, "sdpa_flash": any("flash" in k.lower() for k in names)}
    diagnose("sdpa", kernels)
    del model, opt
    return row


def ceilings(device, dtype, smoke: bool) -> dict:
    """The two rates METHOD.md asks for, measured here: a large matmul and a device copy."""
    from trainer.flops import device_peak_tflops
    n = 256 if smoke else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    src = torch.randn((1 << 20) if smoke else (1 << 30), device=device, dtype=dtype)
    dst = torch.empty_like(src)

    def rate(fn, reps=10):
        for _ in range(3):
            fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / reps
    mm_s = rate(lambda: a @ b)
    cp_s = rate(lambda: dst.copy_(src))
    out = {"matmul": 2 * n ** 3 / mm_s / 1e12, "matmul_n": n, "copy_tb_per_s": 2 * src.numel() * src.element_size() / cp_s / 1e12,
           "datasheet": device_peak_tflops(None)}
    del a, b, src, dst
    return out


def ceilings_part(ctx, sink) -> None:
    """One row: the measured matmul rate and copy bandwidth; ctx.peaks of later parts read it."""
    sink.add({"case": "ceilings", **ceilings(ctx.device, ctx.dtype, ctx.smoke)})


def run(ctx, sink, configs=STEP_CONFIGS) -> None:
    """Each preset on its own, with an equal share of the time left; one that raises or runs
    out of memory is its row's error."""
    from benchmarks.gpu_guard import clean_up, guarded, limited_row
    for i, name in enumerate(configs):
        with limited_row(sink, {"config": name}, ctx.left() / (len(configs) - i), f"step {name}"):
            guarded(sink, {"config": name}, lambda: run_one(name, ctx, sink), ctx.device)
        clean_up(ctx.device)
