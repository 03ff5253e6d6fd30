"""Correctness on the device, before any timing (benchmarks/gpu.sh runs it first):

  routing      expert choice (static, linear_reverse, with padding) and token choice (cf 1.0,
               dropless) on the device select the (token, expert) pairs the CPU does, with the
               same gates, from the same fp32 logits. Exact near-ties are not errors: where the
               scores a selection compares are within TIE_TOL of each other (a token's k-th and
               k+1-th expert, an expert's c-th and c+1-th token, a capacity cut), either choice
               is right, so those pairs are left out of the comparison and counted as ties
  layer_bf16   the bf16 MoE layer against an fp32 copy of itself (same weight and input values,
               so the same routing): ||out - ref|| / ||ref|| < 1e-2 for the output and for the
               input and expert-weight gradients
  grouped_mm   TC dropless's grouped matmul against the per-expert loop it replaces, forward and
               backward, in the layer's dtype

Inputs are drawn fresh for every check, never zeros. Each row says what was compared, the error
and its bound, and `ok`. Every check runs on its own: one that raises is a failed row, and the
others still run.
"""
from __future__ import annotations

import copy

import torch

from benchmarks.gpu_guard import error_fields, guarded
from benchmarks.gpu_setup import device_layer, moe_config, rel_err

LAYER_TOL = 1e-2
GATE_TOL = 1e-5
TIE_TOL = 1e-5      # relative: two selection scores this close are a tie (device math differs by ulps)
MIN_COMPARED = 0.9  # a routing check must compare at least this fraction of its pairs


def _is_tie(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    return (hi - lo) <= TIE_TOL * torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-30)


def tc_comparable(logits_TE: torch.Tensor, k: int, ref, capacity_factor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Token choice: ([T, E] pairs whose selection is decided, [T, E] pairs whose gate is, ties).

    A token whose k-th and k+1-th scores tie may take either expert: its row is left out. With a
    capacity, an expert whose C-th and C+1-th assigned scores tie may keep either token: its
    column is left out; so is any expert at or over capacity that a tied token might move to or
    from (one assignment more or less moves its cut)."""
    from model.moe.routing import token_scores
    T, E = logits_TE.shape
    scores = token_scores(logits_TE.float(), "softmax")
    top = scores.topk(min(k + 1, E), dim=-1)
    tied_T = _is_tie(top.values[:, k - 1], top.values[:, k]) if k < E else torch.zeros(T, dtype=torch.bool)
    skip_E = torch.zeros(E, dtype=torch.bool)
    if capacity_factor is not None:
        C = ref.token_idx.shape[1]
        load_E = ref.tokens_per_expert.long()
        chosen = torch.full((T, E), float("-inf")).scatter(1, top.indices[:, :k], top.values[:, :k])
        by_expert = chosen.t().sort(dim=-1, descending=True).values          # [E, T]
        over_E = load_E > C
        if C < T:
            skip_E |= over_E & _is_tie(by_expert[:, C - 1], by_expert[:, C])
        if k < E:
            near = torch.zeros(E, dtype=torch.bool)
            near[top.indices[tied_T][:, k - 1:k + 1].reshape(-1)] = True
            skip_E |= near & (load_E >= C)
    decided = ~tied_T[:, None] & ~skip_E[None, :]
    return decided, decided, {"tied_tokens": int(tied_T.sum()), "tied_experts": int(skip_E.sum())}


def ec_comparable(logits_BLE: torch.Tensor, k_B, valid_BL) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Expert choice: ([T, E] decided pairs, [T, E] pairs with decided gates, ties). An expert
    whose c_b-th and c_b+1-th scores in sequence b tie may take either token: that (b, expert)
    column is left out, and the gates of sequence b (a gate is a softmax over the experts that
    picked the token)."""
    from model.moe.routing import ec_capacity
    B, L, E = logits_BLE.shape
    scores = logits_BLE.float()
    if valid_BL is not None:
        scores = scores.masked_fill(~valid_BL[..., None], float("-inf"))
    L_B = valid_BL.sum(1).long() if valid_BL is not None else torch.full((B,), L)
    k_B = torch.as_tensor(k_B).long().expand(B)
    c_B = ec_capacity(L_B, k_B, E)
    by_token = scores.transpose(1, 2).sort(dim=-1, descending=True).values   # [B, E, L]
    tied_BE = torch.zeros(B, E, dtype=torch.bool)
    for b in range(B):
        c = int(c_B[b])
        if 0 < c < L:
            tied_BE[b] = _is_tie(by_token[b, :, c - 1], by_token[b, :, c])
    decided = ~tied_BE[:, None, :].expand(B, L, E).reshape(B * L, E)
    gates = ~tied_BE.any(1)[:, None, None].expand(B, L, E).reshape(B * L, E)
    return decided, gates, {"tied_columns": int(tied_BE.sum())}


def compare_routing(ref, got, decided_TE: torch.Tensor, gates_TE: torch.Tensor) -> dict:
    """Mismatched (token, expert) pairs among the decided ones, and the worst gate difference
    among pairs both sides picked with decided gates."""
    E = ref.num_experts
    ref_mask, got_mask = ref.mask.reshape(-1, E).cpu(), got.mask.reshape(-1, E).cpu()
    mismatched = int(((ref_mask != got_mask) & decided_TE).sum())
    both = ref_mask & got_mask & gates_TE
    diff = (ref.gates.reshape(-1, E).cpu() - got.gates.reshape(-1, E).cpu()).abs()
    gate_err = float(diff[both].max()) if both.any() else 0.0
    compared = float(decided_TE.float().mean())
    return {"mismatched_pairs": mismatched, "error": gate_err, "compared_fraction": compared,
            "ok": mismatched == 0 and gate_err < GATE_TOL and compared >= MIN_COMPARED}


def routing_cases(shape: dict, seed: int) -> tuple[torch.Tensor, dict]:
    """(logits [B, L, E], name -> (route(logits, device) -> Routing, comparable(logits, ref) ->
    regions)): a seeded draw of logits, mask ratios and pad positions at `shape` (B capped at 4)."""
    from model.moe.capacity import TimestepCapacity
    from model.moe.routing import expert_choice, token_choice
    B, L, E, k = min(shape["B"], 4), shape["L"], shape["E"], shape["k"]
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, E, generator=g)
    cap = TimestepCapacity("linear_reverse", shape["k_min"], shape["k_max"])
    k_B = cap.k(torch.rand(B, generator=g, dtype=torch.float64))
    valid = torch.rand(B, L, generator=g) > 0.2
    flat = lambda x: x.reshape(B * L, E)   # noqa: E731
    return logits, {
        "ec_static": (lambda x, dev: expert_choice(x, k), lambda x, ref: ec_comparable(x, k, None)),
        "ec_linear_reverse": (lambda x, dev: expert_choice(x, k_B.to(dev)), lambda x, ref: ec_comparable(x, k_B, None)),
        "ec_padded": (lambda x, dev: expert_choice(x, k, valid.to(dev)), lambda x, ref: ec_comparable(x, k, valid)),
        "tc_cf1": (lambda x, dev: token_choice(flat(x), k, 1.0), lambda x, ref: tc_comparable(flat(x), k, ref, 1.0)),
        "tc_dropless": (lambda x, dev: token_choice(flat(x), k), lambda x, ref: tc_comparable(flat(x), k, ref, None)),
    }


def routing_row(name: str, route, comparable, logits: torch.Tensor, device) -> dict:
    ref = route(logits, torch.device("cpu"))
    got = route(logits.to(device), device)
    decided, gates, ties = comparable(logits, ref)
    result = compare_routing(ref, got, decided, gates)
    return {"check": f"routing/{name}", **result, "bound": GATE_TOL, "ties": ties,
            "what": f"{int(ref.mask.sum())} (token, expert) pairs; error = max |gate - CPU gate| "
                    f"over the decided pairs; ties within {TIE_TOL:g} relative left out"}


LAYER_IMPLS = ("ec_static", "ec_linear_reverse", "tc_cf1", "tc_dropless")


def layer_row(shape: dict, impl: str, device, dtype, seed: int) -> dict:
    """One router's layer at `shape` (batch capped at 8), in `dtype` against fp32."""
    B, L, D = min(shape["B"], 8), shape["L"], shape["d"]
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
    return {"check": f"layer_{str(dtype).removeprefix('torch.')}/{impl}", "error": worst, "bound": LAYER_TOL,
            "ok": worst < LAYER_TOL, "errors": errs,
            "what": f"B={B} L={L} d={D} E={shape['E']} h_e={shape['h']}; worst of {', '.join(errs)}"}


def grouped_row(shape: dict, device, dtype, seed: int) -> dict:
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
    return {"check": f"grouped_mm/{str(dtype).removeprefix('torch.')}", "error": worst, "bound": bound,
            "ok": worst < bound, "errors": errs, "grouped_mm_ran": supported,
            "what": ("grouped matmul vs per-expert loop" if supported else
                     "torch._grouped_mm does not run here: both sides took the loop")}


def run(ctx, sink) -> None:
    """Every check at every shape, each on its own (one that raises is a failed row)."""
    for i, (name, shape) in enumerate(ctx.shapes.items()):
        base = {"shape": name}
        try:
            logits, cases = routing_cases(shape, seed=10 + i)
        except Exception as err:   # the draw itself failed: one failed row for all routing cases
            logits, cases = None, {}
            sink.add({**base, "check": "routing", "ok": False, **error_fields(err)})
        for case, (route, comparable) in cases.items():
            guarded(sink, {**base, "check": f"routing/{case}", "ok": False},
                    lambda: {**base, **routing_row(case, route, comparable, logits, ctx.device)}, ctx.device)
        for impl in LAYER_IMPLS:
            check = f"layer_{str(ctx.dtype).removeprefix('torch.')}/{impl}"
            guarded(sink, {**base, "check": check, "ok": False},
                    lambda: {**base, **layer_row(shape, impl, ctx.device, ctx.dtype, seed=20 + i)}, ctx.device)
        if ctx.expert_loop:   # grouped_mm_disabled() would end the forced loop when it exits
            sink.add({**base, "check": "grouped_mm", "ok": True, "skipped": True,
                      "what": "per-expert loop forced for this run: grouped matmul not compared"})
            continue
        guarded(sink, {**base, "check": f"grouped_mm/{str(ctx.dtype).removeprefix('torch.')}", "ok": False},
                lambda: {**base, **grouped_row(shape, ctx.device, ctx.dtype, seed=30 + i)}, ctx.device)
