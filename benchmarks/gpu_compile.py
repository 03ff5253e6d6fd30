"""compile: the owt_ec and owt_tc training steps eager, then with every transformer block compiled.

One model per preset (the step part's shapes: micro-batch 32, 16 layers, bf16 parameters, fused
AdamW), timed eager first (that row is written before compiling starts), then each block is
compiled in place (`nn.Module.compile`, not fullgraph: graph breaks are counted, not fatal) and
the same steps are timed again. TFLOP/s count the capacity actually used (trainer/flops.py), as
the step part does.

    compile_s      the first compiled step plus the warm-up steps, less as many eager steps: the
                   time compiling cost (recompiles for new shapes included)
    graph_breaks   dynamo's count over the whole compile, with its reasons in the JSON
    recompiled_while_timed  graphs compiled during the timed steps (should be 0: a shape that
                   keeps changing would be timed as compile time)

owt_ec gets 60% of the part's time, owt_tc what is left; a compile that runs past it is cut and
the row says at which stage. An out-of-memory at micro-batch 32 is retried once at 16 (the row
says so).
"""
from __future__ import annotations

import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from benchmarks.gpu_setup import STEP_CONFIGS, device_model, step_config, sync
from benchmarks.gpu_step import batches, measure, rates, train_step


def dynamo_counts() -> dict:
    reasons = {str(k).strip().splitlines()[0][:160]: v for k, v in counters["graph_break"].items()}
    return {"graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"].get("unique_graphs", 0), "graph_break_reasons": reasons}


def build(name: str, ctx, batch: int | None = None):
    cfg, B, L = step_config(name, ctx.smoke)
    B = batch or B
    model = device_model(cfg, ctx.device, ctx.dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=ctx.device.type == "cuda")
    return cfg, B, L, model, opt, batches(cfg, B, L, ctx.device)


def eager_row(name: str, ctx, sink) -> tuple:
    """Build and time eager, at micro-batch 32, else 16 after an out-of-memory."""
    from benchmarks.gpu_guard import clean_up
    _, B0, _ = step_config(name, ctx.smoke)
    for B in (B0, B0 // 2):
        try:
            cfg, B, L, model, opt, data = build(name, ctx, B)
            times, counts = measure(model, opt, data, ctx.device, ctx.step_warmup, ctx.step_repeat)
            break
        except torch.OutOfMemoryError:
            model = opt = data = None
            clean_up(ctx.device)
            if B != B0 or B0 // 2 < 1:
                raise
    row = sink.add({"config": name, "B": B, "L": L, "layers": cfg.model.n_layers,
                    "reduced": None if B == B0 else f"micro-batch {B0} ran out of memory: {B}",
                    **rates(cfg, B, L, times, counts, ctx.peaks, prefix="eager_"),
                    "backend": ctx.compile_backend, "stage": "eager timed"})
    return row, cfg, model, opt, data


def compiled(row: dict, cfg, model, opt, data, ctx, sink) -> None:
    torch._dynamo.reset()
    counters.clear()
    for block in model.blocks:
        block.compile(backend=ctx.compile_backend)
    row["stage"] = "compiling (first step)"
    sink.save()
    warm = []
    for i in range(1 + max(ctx.step_warmup, 2)):   # shapes change from batch to batch: absorb recompiles
        sync(ctx.device)
        t0 = time.perf_counter()
        train_step(model, opt, data[i % len(data)])
        sync(ctx.device)
        warm.append(time.perf_counter() - t0)
        row.update(first_step_s=warm[0], warmup_steps_s=warm, stage="compiled warm-up")
        sink.save()
    row["compile_s"] = max(sum(warm) - len(warm) * row["eager_ms"] / 1e3, 0.0)
    row.update(dynamo_counts())
    graphs = row["unique_graphs"]
    row["stage"] = "compiled timing"
    sink.save()
    times, counts = measure(model, opt, data, ctx.device, 0, ctx.step_repeat)
    row.update(rates(cfg, row["B"], row["L"], times, counts, ctx.peaks, prefix="compiled_"))
    row["recompiled_while_timed"] = dynamo_counts()["unique_graphs"] - graphs
    row["speedup"] = row["eager_ms"] / row["compiled_ms"]
    row["stage"] = "done"
    sink.save()


def share(configs, i: int) -> float:
    """Fraction of the time left that preset i gets: expert choice, the one this project is
    about, gets 60% when it comes first; the rest is split evenly (and unused time carries on)."""
    rest = len(configs) - i
    if rest > 1 and configs[i] == "owt_ec":
        return 0.6
    return 1.0 / rest


def run(ctx, sink, configs=STEP_CONFIGS) -> None:
    from benchmarks.gpu_guard import clean_up, error_fields, limited_row
    for i, name in enumerate(configs):
        state = {}
        with limited_row(sink, {"config": name}, ctx.left() * share(configs, i), f"compile {name}"):
            try:
                state["row"], cfg, model, opt, data = eager_row(name, ctx, sink)
                compiled(state["row"], cfg, model, opt, data, ctx, sink)
            except Exception as err:   # this preset's row records it; the next preset runs
                row = state.get("row") or sink.add({"config": name})
                row.update(error_fields(err))
                sink.save()
        state.clear()
        model = opt = data = None
        torch._dynamo.reset()
        clean_up(ctx.device)
