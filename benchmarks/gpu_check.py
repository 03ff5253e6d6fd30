"""Correctness on the device, before any timing (benchmarks/gpu.sh runs it first):

  routing      expert choice (static, linear_reverse, with padding) and token choice (cf 1.0,
               dropless) on the device select exactly the (token, expert) pairs the CPU does,
               with the same gates, from the same fp32 logits
  layer_bf16   the bf16 MoE layer against an fp32 copy of itself (same weight and input values,
               so the same routing): ||out - ref|| / ||ref|| < 1e-2 for the output and for the
               input and expert-weight gradients
  grouped_mm   TC dropless's grouped matmul against the per-expert loop it replaces, forward and
               backward, in the layer's dtype

Inputs are drawn fresh for every check, never zeros. Each row says what was compared, the error
and its bound, and `ok`.
"""
from __future__ import annotations

import copy

import torch

from benchmarks.gpu_setup import device_layer, moe_config, rel_err

LAYER_TOL = 1e-2
GATE_TOL = 1e-5


def routing_rows(shape: dict, device, seed: int) -> list[dict]:
    from model.moe.capacity import TimestepCapacity
    from model.moe.routing import expert_choice, token_choice
    B, L, E, k = min(shape["B"], 4), shape["L"], shape["E"], shape["k"]
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, E, generator=g)
    cap = TimestepCapacity("linear_reverse", shape["k_min"], shape["k_max"])
    k_B = cap.k(torch.rand(B, generator=g, dtype=torch.float64))
    valid = torch.rand(B, L, generator=g) > 0.2
    cases = {
        "ec_static": lambda x, dev: expert_choice(x, k),
        "ec_linear_reverse": lambda x, dev: expert_choice(x, k_B.to(dev)),
        "ec_padded": lambda x, dev: expert_choice(x, k, valid.to(dev)),
        "tc_cf1": lambda x, dev: token_choice(x.reshape(B * L, E), k, 1.0),
        "tc_dropless": lambda x, dev: token_choice(x.reshape(B * L, E), k),
    }
    rows = []
    for name, route in cases.items():
        ref, got = route(logits, torch.device("cpu")), route(logits.to(device), device)
        mismatched = int((ref.mask != got.mask.cpu()).sum())
        gate_err = float((ref.gates - got.gates.cpu()).abs().max())
        rows.append({"check": f"routing/{name}", "mismatched_pairs": mismatched, "error": gate_err,
                     "bound": GATE_TOL, "ok": mismatched == 0 and gate_err < GATE_TOL,
                     "what": f"{ref.mask.sum()} (token, expert) pairs; error = max |gate - CPU gate|"})
    return rows


def layer_rows(shape: dict, device, dtype, seed: int) -> list[dict]:
    """Every router of the layer benchmark at `shape` (batch capped at 8), in `dtype` against fp32."""
    rows = []
    B, L, D = min(shape["B"], 8), shape["L"], shape["d"]
    for impl in ("ec_static", "ec_linear_reverse", "tc_cf1", "tc_dropless"):
        layer = device_layer(D, moe_config(shape, impl), device, dtype, seed)
        ref_layer = copy.deepcopy(layer).float()   # the same values, upcast: routing is identical
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(B, L, D, generator=g).to(device, dtype).requires_grad_()
        x_ref = x.detach().float().requires_grad_()
        r_B = torch.rand(B, generator=g).to(device)
        grad = torch.randn(B, L, D, generator=g).to(device)
        outs = []
        for m, inp in ((layer, x), (ref_layer, x_ref)):
            out = m(inp, r_B)
            out.hidden.backward(grad.to(out.hidden.dtype))
            outs.append((out.hidden, inp.grad, m.experts.w_in_EDF.grad, m.experts.w_out_EHD.grad))
        errs = {name: rel_err(a, b) for name, a, b in zip(("out", "grad_x", "grad_w_in", "grad_w_out"), *outs)}
        worst = max(errs.values())
        rows.append({"check": f"layer_{str(dtype).removeprefix('torch.')}/{impl}", "error": worst, "bound": LAYER_TOL,
                     "ok": worst < LAYER_TOL, "errors": errs,
                     "what": f"B={B} L={L} d={D} E={shape['E']} h_e={shape['h']}; worst of {', '.join(errs)}"})
        del layer, ref_layer
    return rows


def grouped_rows(shape: dict, device, dtype, seed: int) -> list[dict]:
    from model.moe.experts import grouped_mm_disabled, grouped_mm_supported
    B, L, D = min(shape["B"], 8), shape["L"], shape["d"]
    layer = device_layer(D, moe_config(shape, "tc_dropless"), device, dtype, seed)
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(B, L, D, generator=g).to(device, dtype)
    grad = torch.randn(B, L, D, generator=g).to(device, dtype)
    supported = grouped_mm_supported(x)
    results = []
    for loop in (False, True):
        xi = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        if loop:
            with grouped_mm_disabled():
                out = layer(xi)
        else:
            out = layer(xi)
        out.hidden.backward(grad)
        results.append((out.hidden, xi.grad, layer.experts.w_in_EDF.grad.clone(), layer.experts.w_out_EHD.grad.clone()))
    errs = {name: rel_err(a, b) for name, a, b in zip(("out", "grad_x", "grad_w_in", "grad_w_out"), *results)}
    worst = max(errs.values())
    # the two compute the same sums in a different order: bf16 rounding apart, not bitwise
    bound = 1e-5 if dtype == torch.float32 else LAYER_TOL
    return [{"check": f"grouped_mm/{str(dtype).removeprefix('torch.')}", "error": worst, "bound": bound,
             "ok": worst < bound, "errors": errs, "grouped_mm_ran": supported,
             "what": ("grouped matmul vs per-expert loop" if supported else
                      "torch._grouped_mm does not run here: both sides took the loop")}]


def run(shapes: dict, device, dtype) -> list[dict]:
    rows = []
    for i, (name, shape) in enumerate(shapes.items()):
        for r in routing_rows(shape, device, seed=10 + i) + layer_rows(shape, device, dtype, seed=20 + i) \
                + grouped_rows(shape, device, dtype, seed=30 + i):
            rows.append({"shape": name, **r})
    return rows
