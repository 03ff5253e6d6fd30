"""The router alone, at the OWT shape, in fp32, tf32 and bf16: is its matmul worth a precision option?

The router's logits are x [T, D] @ w [D, E]: 2 T D E FLOPs forward, 3x that with the backward
(25.8 GFLOP per layer at T = 32 x 512, D = E = 512). In fp32 that runs on CUDA cores, not tensor
cores, so it may cost a large fraction of a dense layer's time (issue 21 estimated a quarter).
Per precision, two steps, forward + backward against fixed random upstream gradients:

    matmul   the logits alone: time and achieved TFLOP/s
    route    the logits and the selection the layer makes from them (owt_ec's router: expert
             choice, linear_reverse capacity from the mask ratios), its gates' backward included

The model's own code is used wherever it exists: `moe.router_precision` when this checkout's
config has it (the layer is built with it) and the layer's `router_logits(x)` method when it has
one, else the layer's fp32 path with the input cast to the precision here (tf32: fp32 tensors
under `torch.set_float32_matmul_precision('high')`). Each row says which (`router_code`). A precision
that raises is its own error row.
"""
from __future__ import annotations

import contextlib

import torch

from benchmarks.common import median_ms
from benchmarks.gpu_layer import time_guarded
from benchmarks.gpu_setup import device_layer, has_option, moe_config

PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def tf32(enabled: bool):
    """fp32 matmuls on tensor cores (TF32) inside the block; a no-op on the CPU."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def logits_fn(layer, precision: str, from_config: bool):
    """(x_BLD -> fp32 logits, how it was computed): the model's own router matmul
    (model.moe.layer.router_logits) at moe.router_precision where this checkout has them."""
    try:
        from model.moe.layer import router_logits
    except ImportError:
        router_logits = None
    w = layer.router.weight
    if from_config and router_logits is not None:
        return (lambda x: router_logits(x, w, precision).float()), "model: moe.router_precision"
    if precision == "bf16":
        return (lambda x: torch.nn.functional.linear(x.bfloat16(), w.bfloat16()).float()), \
            "here: bf16 cast of x and w (no router_logits in the model)"

    def fp32(x):
        with tf32(precision == "tf32"):
            return torch.nn.functional.linear(x.float(), w.float())
    return fp32, f"here: fp32 cast{', tf32 on' if precision == 'tf32' else ''} (no router_logits in the model)"


def run(ctx, sink, precisions=PRECISIONS) -> None:
    from benchmarks.gpu_guard import error_fields
    s = ctx.shapes["owt"]
    B, L, D, E = s["B"], s["L"], s["d"], s["E"]
    T = B * L
    with_option = has_option("moe", "router_precision")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, L, D, generator=g).to(ctx.device, ctx.dtype).requires_grad_()
    r_B = torch.rand(B, generator=g).to(ctx.device)
    grad_logits = torch.randn(B, L, E, generator=g).to(ctx.device)
    steps, info = {}, {}
    for p in precisions:
        try:
            cfg = moe_config(s, "ec_linear_reverse")
            if with_option:
                import dataclasses
                cfg = dataclasses.replace(cfg, router_precision=p)
            layer = device_layer(D, cfg, ctx.device, ctx.dtype)
            fn, how = logits_fn(layer, p, with_option)
            grad_gate = None

            def matmul(fn=fn, layer=layer):
                for _ in range(ctx.calls):
                    x.grad, layer.router.weight.grad = None, None
                    fn(x).backward(grad_logits)

            def route(fn=fn, layer=layer):
                nonlocal grad_gate
                for _ in range(ctx.calls):
                    x.grad, layer.router.weight.grad = None, None
                    routing, _ = layer.route(fn(x), r_B, None)
                    if grad_gate is None or grad_gate.shape != routing.gate.shape:
                        grad_gate = torch.ones_like(routing.gate)
                    routing.gate.backward(grad_gate)
            steps[f"{p} matmul"], steps[f"{p} route"] = matmul, route
            info[p] = how
        except Exception as err:
            sink.add({"precision": p, "case": "build", **error_fields(err)})
    times, errors, _, _ = time_guarded(steps, ctx.warmup, ctx.repeat, ctx.device)
    dense = [r for r in (ctx.results.get("layer") or []) if r.get("shape") == "owt" and r.get("impl") == "dense"
             and r.get("ms")]
    dense_ms = dense[0]["ms"] if dense else None
    gflop = 3 * 2 * T * D * E / 1e9
    for p in precisions:
        if p not in info:
            continue
        row = {"precision": p, "B": B, "L": L, "d": D, "E": E, "router_code": info[p],
               "router_precision_option": with_option, "matmul_gflop": gflop, "calls_per_sample": ctx.calls,
               "dense_layer_ms": dense_ms}
        for what in ("matmul", "route"):
            key = f"{p} {what}"
            if key in errors:
                row[f"{what}_error"] = error_fields(errors[key])["error"]
            elif key in times:
                row[f"{what}_ms"] = median_ms(times[key]) / ctx.calls
        if row.get("matmul_ms"):
            row["tflop_per_s"] = gflop / row["matmul_ms"]
        if row.get("route_ms") and dense_ms:
            row["ratio_to_dense"] = row["route_ms"] / dense_ms
        if "matmul_error" in row and "route_error" in row:
            row["error"] = row["matmul_error"]
        sink.add(row)
