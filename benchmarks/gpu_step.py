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

from benchmarks.gpu_setup import device_model, step_config, sync


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


def run_one(name: str, device, dtype, warmup: int, repeat: int, smoke: bool, peaks: dict) -> dict:
    from benchmarks.host_syncs import HostSyncCounter
    from model import forward_loss
    from trainer.flops import train_flops
    cfg, B, L = step_config(name, smoke)
    model = device_model(cfg, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    data = batches(cfg, B, L, device)
    for i in range(warmup):
        train_step(model, opt, data[i % len(data)])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, results = [], []
    for i in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        results.append(train_step(model, opt, data[i % len(data)]))
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    # what was computed, read back only now: routed assignments and masked positions per step
    flops = [train_flops(cfg, B * L, L, masked, assignments) for masked, assignments in torch.stack(results).tolist()]
    sec = statistics.median(times)
    tflops = statistics.median(f / t for f, t in zip(flops, times)) / 1e12
    row = {"config": name, "B": B, "L": L, "params_B": n_params / 1e9, "ms": sec * 1e3,
           "min_ms": min(times) * 1e3, "times_ms": [t * 1e3 for t in times],
           "tokens_per_s": B * L / sec, "tflop_per_step": statistics.median(flops) / 1e12, "tflop_per_s": tflops,
           "mfu_datasheet": tflops / peaks["datasheet"] if peaks.get("datasheet") else None,
           "mfu_measured": tflops / peaks["matmul"] if peaks.get("matmul") else None,
           "peak_mem_gb": peak / 2**30 if peak else None, "dtype": str(dtype).removeprefix("torch."),
           "optimizer": "AdamW, fused" if device.type == "cuda" else "AdamW (foreach)"}
    if device.type == "cuda":
        row["cuda_syncs_per_step"] = cuda_sync_count(lambda: train_step(model, opt, data[0]))
        sync(device)
    with HostSyncCounter() as sc:   # forward and backward: the optimizer's CPU step counters are no sync
        parts(forward_loss(model, *data[1]))[0].backward()
    opt.zero_grad(set_to_none=True)
    row["counted_syncs_per_step"] = sc.total
    row["counted_syncs_in_moe_layers"] = sc.count("model/moe/")
    row["moe_layers"] = len(model.moe_layers())
    row["sync_sites"] = sc.by_site()
    try:
        kernels = sdpa_kernels(model, data[2], device)
    except Exception as err:   # a profiler that cannot start here must not cost the step's numbers
        kernels = [f"profiler failed: {err!r}"[:200]]
    row["sdpa_kernels"] = kernels
    row["sdpa_flash"] = any("flash" in k.lower() and "failed" not in k for k in kernels)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
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


def run(device, dtype, warmup: int, repeat: int, smoke: bool, peaks: dict) -> list[dict]:
    rows = []
    for name in ("owt_ec", "owt_tc"):
        try:
            rows.append(run_one(name, device, dtype, warmup, repeat, smoke, peaks))
        except torch.OutOfMemoryError as err:   # recorded: the table says so instead of stopping
            rows.append({"config": name, "error": f"out of memory: {str(err)[:200]}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
