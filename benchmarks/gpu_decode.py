"""The `decode` part of the GPU measurement: tokens/s of the plain sampler against cached decoding
at the owt_ec and owt_tc shapes (benchmarks/gpu_setup.py), batch 1 and 32, random weights.

    rows = run(args)   # args: smoke (toy shapes, CPU), device, warmup, repeat, gen_length, block, prompt_length

Settings, every one greedy with blocks of `block`: `plain` (one token per step, no cache: the
sampler before block caches), `fixed+dual` (the same steps, dual cache: what the cache alone
saves per forward) and `threshold+dual` (tau 0.9, dual cache). Random weights are not confident,
so threshold decoding here commits about one token per step: its NFE is printed beside its time,
and a trained model's parallelism (benchmarks/sampling.py) multiplies on top. tokens/s = batch x
gen_length / median seconds of one generate call, after `warmup` calls.
"""
from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch

from benchmarks.gpu_setup import STEP_CONFIGS, device_model, step_config, sync
from evaluation.sample import SampleConfig, generate

SETTINGS = {"plain": dict(decoding="fixed", cache="none"),
            "fixed+dual": dict(decoding="fixed", cache="dual"),
            "threshold+dual": dict(decoding="threshold", cache="dual", threshold=0.9)}
BATCHES = (1, 32)
SMOKE = dict(batches=(1, 4), gen_length=16, block=8, prompt_length=8)


def options(args) -> SimpleNamespace:
    """The settings this part reads from `args` (any object; missing fields take defaults)."""
    smoke = bool(getattr(args, "smoke", False) or getattr(args, "cpu_smoke", False))
    dev = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    return SimpleNamespace(
        smoke=smoke, device=torch.device(dev),
        dtype=torch.bfloat16 if torch.device(dev).type == "cuda" else torch.float32,
        warmup=int(getattr(args, "warmup", None) or 1), repeat=int(getattr(args, "repeat", None) or 3),
        batches=SMOKE["batches"] if smoke else BATCHES,
        gen_length=int(getattr(args, "gen_length", None) or (SMOKE["gen_length"] if smoke else 128)),
        block=int(getattr(args, "block", None) or (SMOKE["block"] if smoke else 32)),
        prompt_length=int(getattr(args, "prompt_length", None) or (SMOKE["prompt_length"] if smoke else 64)))


def time_call(fn, device, warmup: int, repeat: int) -> tuple[float, object]:
    out = None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@torch.no_grad()
def config_rows(o, name: str):
    """Rows of one config, one per (batch, setting), yielded as each is measured; a setting that
    fails becomes its row's error and the others still run."""
    from benchmarks.gpu_guard import error_fields
    cfg, _, L = step_config(name, o.smoke)
    if o.prompt_length + o.gen_length > L:
        raise ValueError(f"prompt_length {o.prompt_length} + gen_length {o.gen_length} exceeds {name}'s "
                         f"max_seq_len {L}")
    model = device_model(cfg, o.device, o.dtype).eval()
    g = torch.Generator().manual_seed(0)
    try:
        for batch in o.batches:
            prompts = torch.randint(4, cfg.model.vocab_size, (batch, o.prompt_length), generator=g).tolist()
            base = None
            for setting, kw in SETTINGS.items():
                row = {"part": "decode", "case": f"{name} b{batch} {setting}", "config": name, "batch": batch,
                       "setting": setting, "gen_length": o.gen_length, "block": o.block,
                       "prompt_length": o.prompt_length, "dtype": str(o.dtype).removeprefix("torch."),
                       "device": o.device.type}
                try:
                    sc = SampleConfig(gen_length=o.gen_length, steps=o.gen_length, block_length=o.block, **kw)
                    seconds, out = time_call(lambda sc=sc: generate(model, prompts, sc), o.device, o.warmup,
                                             o.repeat)
                except Exception as err:   # an out-of-memory at batch 32 too: the other rows stand
                    yield {**row, **error_fields(err)}
                    continue
                tps = batch * o.gen_length / seconds
                base = base or tps
                yield {**row, "nfe": out.forward_passes, "seconds": seconds, "tokens_per_s": tps,
                       "speedup_vs_plain": tps / base}
    finally:
        del model
        if o.device.type == "cuda":
            torch.cuda.empty_cache()


def run(args) -> list[dict]:
    """One row per (config, batch, setting): seconds, tokens/s, NFE, speedup over plain."""
    o = options(args)
    return [row for name in STEP_CONFIGS for row in config_rows(o, name)]


def part(ctx, sink) -> None:
    """benchmarks/gpu_main.py's entry: each row reaches the sink as it is measured, and a config
    that fails to build keeps the other's rows."""
    from benchmarks.gpu_guard import error_fields
    # one timed call after one warm-up: an eager plain decode of 128 tokens takes seconds per call
    o = options(SimpleNamespace(smoke=ctx.smoke, device=str(ctx.device), repeat=1))
    o.dtype = ctx.dtype
    for name in STEP_CONFIGS:
        try:
            for row in config_rows(o, name):
                sink.add(row)
        except Exception as err:
            sink.add({"part": "decode", "case": name, "config": name, **error_fields(err)})


if __name__ == "__main__":
    import argparse
    import json
    p = argparse.ArgumentParser(description="decode part of the GPU measurement, alone")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--repeat", type=int, default=3)
    for r in run(p.parse_args()):
        print(json.dumps(r))
