"""One MoE layer, forward + backward, in the device's dtype, against the dense floor.

    ec_static          expert choice, static k (C = L k / E per sequence)
    ec_linear_reverse  expert choice, k_b from the mask ratio (k_min..k_max, E[k] = k); the
                       ratios are drawn uniformly, as training draws them
    tc_cf1             token choice top-k, capacity factor 1.0 (padding slots computed)
    tc_dropless        token choice top-k, no capacity (grouped matmul over ragged rows)
    dense              one SwiGLU of width k h_e on the same tokens: the FLOP floor
    deepspeed          DeepSpeed's MoE layer (TopKGate, same k and experts), only where it imports

TFLOP/s count the slots each layer actually computed (EC: sum of its capacities; TC cf: E*C
padded slots; dropless: T*k rows), 6 d h_e per slot forward, twice that backward, plus the
router; DeepSpeed's one-hot einsums are not counted as useful work (see benchmarks/moe_layer.py).

A timed sample is `ctx.calls` back-to-back calls (5 on a GPU) between two device syncs: the host
queues the next call while the device runs this one, as in training, and one sync's cost is spread
over several calls; `ms` is per call. Every
implementation is built and called once on its own first: one that raises is an error row and
the others are timed without it.
"""
from __future__ import annotations

import importlib.util

import torch

from benchmarks.common import median_ms, time_interleaved
from benchmarks.gpu_setup import device_layer, moe_config

IMPLS = ("ec_static", "ec_linear_reverse", "tc_cf1", "tc_dropless", "dense")


@torch.no_grad()
def slots(layer, x, r_B) -> int:
    logits = torch.nn.functional.linear(x.float(), layer.router.weight.float())
    routing, _ = layer.route(logits, r_B, None)
    return routing.token_idx.numel()


def make_step(fn, params, x, grad, calls: int = 1):
    """fn(x) -> (hidden, loss or None); one step is `calls` back-to-back forward + backward
    calls, each backpropagating grad into hidden and 1 into loss."""
    def step():
        for _ in range(calls):
            for p in params:
                p.grad = None
            x.grad = None
            hidden, loss = fn(x)
            outs, grads = [hidden], [grad]
            if loss is not None:
                outs.append(loss)
                grads.append(torch.ones_like(loss))
            torch.autograd.backward(outs, grads)
    return step


def time_guarded(steps: dict, warmup: int, repeat: int, device) -> tuple[dict, dict, list, int]:
    """(seconds per sample of each step that ran, {name: exception} of those that raised,
    foreign loads, rounds discarded). Each step runs once alone first; the ones that pass are
    timed interleaved; should that still raise, each is timed alone."""
    from benchmarks.gpu_guard import clean_up
    errors, ok = {}, {}
    for name, step in steps.items():
        try:
            step()
            ok[name] = step
        except Exception as err:   # this implementation, not the others
            errors[name] = err
            clean_up(device)
    if not ok:
        return {}, errors, [0.0], 0
    try:
        times, loads, discarded = time_interleaved(ok, max(warmup - 1, 0), repeat, device)
        return times, errors, loads, discarded
    except Exception:
        clean_up(device)
    times, loads, discarded = {}, [0.0], 0
    for name, step in ok.items():
        try:
            t, load, d = time_interleaved({name: step}, 0, repeat, device)
            times[name], loads, discarded = t[name], loads + load, discarded + d
        except Exception as err:
            errors[name] = err
            clean_up(device)
    return times, errors, loads, discarded


def deepspeed_step(shape, x, grad, device, dtype):
    """DeepSpeed's layer through benchmarks/moe_layer.py's builder (a 1-rank group)."""
    from types import SimpleNamespace

    from benchmarks.moe_layer import deepspeed_layer
    args = SimpleNamespace(d_model=shape["d"], hidden=shape["h"], experts=shape["E"], k=shape["k"])
    moe = deepspeed_layer(args).to(device, dtype)

    def fn(inp):
        hidden, l_aux, _ = moe(inp)
        return hidden, l_aux
    return make_step(fn, list(moe.parameters()), x, grad), moe


def build(impl: str, s: dict, x, grad, r_B, device, dtype, calls: int):
    """(step, info, module) of one implementation at shape `s`."""
    from model.moe.experts import SwiGLU
    B, L, D, E, H, k = s["B"], s["L"], s["d"], s["E"], s["h"], s["k"]
    T = B * L
    if impl == "dense":
        with torch.device(device):
            m = SwiGLU(D, k * H).to(dtype)
        step = make_step(lambda inp: (m(inp), None), list(m.parameters()), x, grad, calls)
        n_slots, router = T * k, 0
    else:
        m = device_layer(D, moe_config(s, impl), device, dtype)
        step = make_step(lambda inp: (lambda o: (o.hidden, o.loss))(m(inp, r_B)), list(m.parameters()), x, grad, calls)
        n_slots, router = slots(m, x, r_B), 2 * T * D * E
    return step, {"slots": n_slots, "mean_k": n_slots / T, "tflop": 3 * (6 * D * H * n_slots + router) / 1e12}, m


def shape_rows(ctx, sink, shape_name: str, s: dict, impls) -> None:
    from benchmarks.gpu_guard import error_fields
    B, L, D, E, H, k = s["B"], s["L"], s["d"], s["E"], s["h"], s["k"]
    T = B * L
    base = {"shape": shape_name, "B": B, "L": L, "d": D, "E": E, "h_e": H, "k": k}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, D, generator=g).to(ctx.device, ctx.dtype).requires_grad_()
    grad = torch.randn(B, L, D, generator=g).to(ctx.device, ctx.dtype)
    r_B = torch.rand(B, generator=g).to(ctx.device)
    steps, info, keep = {}, {}, []
    for impl in impls:
        try:
            steps[impl], info[impl], m = build(impl, s, x, grad, r_B, ctx.device, ctx.dtype, ctx.calls)
            keep.append(m)
        except Exception as err:   # this implementation's row says why; the others go on
            sink.add({**base, "impl": impl, **error_fields(err)})
    if ctx.with_deepspeed:
        try:
            steps["deepspeed"], m = deepspeed_step(s, x, grad, ctx.device, ctx.dtype)
            keep.append(m)
            C = -(-T * k // E)
            info["deepspeed"] = {"slots": E * C, "mean_k": E * C / T,
                                 "tflop": 3 * (6 * D * H * E * C + 2 * T * D * E) / 1e12}
        except Exception as err:   # recorded, not fatal: DeepSpeed is optional here
            sink.add({**base, "impl": "deepspeed", **error_fields(err)})
    times, errors, loads, discarded = time_guarded(steps, ctx.warmup, ctx.repeat, ctx.device)
    for impl, err in errors.items():
        sink.add({**base, "impl": impl, **error_fields(err)})
    dense_ms = median_ms(times["dense"]) / ctx.calls if "dense" in times else None
    for impl in steps:
        if impl not in times:
            continue
        per_call = [t / ctx.calls for t in times[impl]]
        ms = median_ms(per_call)
        sink.add({**base, "impl": impl, "ms": ms, "min_ms": min(per_call) * 1e3,
                  "times_ms": [t * 1e3 for t in per_call], "calls_per_sample": ctx.calls, **info[impl],
                  "tflop_per_s": info[impl]["tflop"] / ms * 1e3,
                  "ratio_to_dense": ms / dense_ms if dense_ms else None,
                  "experts_path": "per-expert loop (forced)" if ctx.expert_loop else "default",
                  "foreign_cores_max": max(loads), "rounds_discarded": discarded})


def run(ctx, sink, impls=IMPLS) -> None:
    """Every implementation at every shape; one shape's failure (its inputs, say) is its row."""
    from benchmarks.gpu_guard import clean_up, guarded
    for shape_name, s in ctx.shapes.items():
        guarded(sink, {"shape": shape_name, "impl": "(all)"}, lambda: shape_rows(ctx, sink, shape_name, s, impls),
                ctx.device)
        clean_up(ctx.device)


def deepspeed_importable() -> bool:
    return importlib.util.find_spec("deepspeed") is not None
