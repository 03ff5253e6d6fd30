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


def make_step(fn, params, x, grad):
    """fn(x) -> (hidden, loss or None); the step backpropagates grad into hidden, 1 into loss."""
    def step():
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


def run(shapes: dict, device, dtype, warmup: int, repeat: int, with_deepspeed: bool) -> list[dict]:
    from model.moe.experts import SwiGLU
    rows = []
    for shape_name, s in shapes.items():
        B, L, D, E, H, k = s["B"], s["L"], s["d"], s["E"], s["h"], s["k"]
        T = B * L
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, L, D, generator=g).to(device, dtype).requires_grad_()
        grad = torch.randn(B, L, D, generator=g).to(device, dtype)
        r_B = torch.rand(B, generator=g).to(device)
        steps, info, keep = {}, {}, []
        for impl in IMPLS:
            if impl == "dense":
                with torch.device(device):
                    m = SwiGLU(D, k * H).to(dtype)
                steps[impl] = make_step(lambda inp, m=m: (m(inp), None), list(m.parameters()), x, grad)
                n_slots, router = T * k, 0
            else:
                m = device_layer(D, moe_config(s, impl), device, dtype)
                steps[impl] = make_step(lambda inp, m=m: (lambda o: (o.hidden, o.loss))(m(inp, r_B)),
                                        list(m.parameters()), x, grad)
                n_slots, router = slots(m, x, r_B), 2 * T * D * E
            keep.append(m)
            info[impl] = {"slots": n_slots, "mean_k": n_slots / T, "tflop": 3 * (6 * D * H * n_slots + router) / 1e12}
        if with_deepspeed:
            try:
                steps["deepspeed"], m = deepspeed_step(s, x, grad, device, dtype)
                keep.append(m)
                C = -(-T * k // E)
                info["deepspeed"] = {"slots": E * C, "mean_k": E * C / T,
                                     "tflop": 3 * (6 * D * H * E * C + 2 * T * D * E) / 1e12}
            except Exception as err:   # recorded, not fatal: DeepSpeed is optional here
                rows.append({"shape": shape_name, "impl": "deepspeed", "error": repr(err)[:300]})
        times, loads, discarded = time_interleaved(steps, warmup, repeat, device)
        dense_ms = median_ms(times["dense"])
        for impl in steps:
            ms = median_ms(times[impl])
            rows.append({"shape": shape_name, "impl": impl, "B": B, "L": L, "d": D, "E": E, "h_e": H, "k": k,
                         "ms": ms, "min_ms": min(times[impl]) * 1e3, "times_ms": [t * 1e3 for t in times[impl]],
                         **info[impl], "tflop_per_s": info[impl]["tflop"] / ms * 1e3, "ratio_to_dense": ms / dense_ms,
                         "foreign_cores_max": max(loads), "rounds_discarded": discarded})
        del keep, steps, x, grad
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def deepspeed_importable() -> bool:
    return importlib.util.find_spec("deepspeed") is not None
