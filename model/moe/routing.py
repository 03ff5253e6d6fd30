"""Routing math: who processes which token, with which gate. Pure functions, no communication.

Shape legend: B batch, L sequence, T = B*L flat tokens, E experts, C slots per expert (capacity),
N ragged assignments, D model dim.

A `Routing` keeps the compact form the dispatcher needs (slot -> token index, slot gate, grouped by
expert); `.mask` and `.gates` give dense [..., E] views for users and tests.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Router math runs in fp32 under bf16, but float64 (gradcheck) must stay float64."""
    return t if t.dtype == torch.float64 else t.float()


@dataclass
class Routing:
    token_idx: torch.Tensor        # [E, C] fixed capacity, or [N] ragged (grouped by expert); flat index < T
    gate: torch.Tensor             # same shape as token_idx, fp32, 0 in padding slots
    shape: tuple                   # leading shape of the logits: (B, L) or (T,)
    num_experts: int
    counts: Optional[torch.Tensor] = None      # [E] assignments per expert (ragged only)
    slot_valid: Optional[torch.Tensor] = None  # [E, C] False in padding slots (TC with capacity)
    capacity_static: bool = False  # C follows from shapes alone, so every rank knows it
    tokens_per_expert: Optional[torch.Tensor] = None  # [E] float, before capacity drops
    drop_frac: Optional[torch.Tensor] = None   # EC: tokens no expert picked; TC: assignments dropped
    num_valid_tokens: Optional[torch.Tensor] = None

    @property
    def fixed(self) -> bool:
        return self.token_idx.dim() == 2

    @property
    def num_tokens(self) -> int:
        return math.prod(self.shape)

    def expert_of_slot(self) -> torch.Tensor:
        """Expert id of every slot, same shape as token_idx."""
        if self.fixed:
            E, C = self.token_idx.shape
            return torch.arange(E, device=self.token_idx.device)[:, None].expand(E, C)
        return torch.repeat_interleave(torch.arange(self.num_experts, device=self.counts.device), self.counts)

    def num_assignments(self) -> torch.Tensor:
        """Valid (token, expert) pairs actually computed: the FLOP count's multiplier."""
        if self.slot_valid is not None:
            return self.slot_valid.sum()
        # torch.full, not torch.tensor: a fill kernel, where a copy from host memory would sync
        return torch.full((), self.token_idx.numel(), dtype=torch.long, device=self.token_idx.device)

    def _dense(self, values: torch.Tensor, fill) -> torch.Tensor:
        T, E = self.num_tokens, self.num_experts
        out = torch.full((T, E), fill, dtype=values.dtype, device=values.device)
        tok, exp, val = self.token_idx.reshape(-1), self.expert_of_slot().reshape(-1), values.reshape(-1)
        if self.slot_valid is not None:
            keep = self.slot_valid.reshape(-1)
            tok, exp, val = tok[keep], exp[keep], val[keep]
        out[tok, exp] = val
        return out.view(*self.shape, E)

    @property
    def mask(self) -> torch.Tensor:
        return self._dense(torch.ones_like(self.gate, dtype=torch.bool), False)

    @property
    def gates(self) -> torch.Tensor:
        return self._dense(self.gate, 0.0)


# ---- expert choice -------------------------------------------------------------------------------
def ec_capacity(num_valid: torch.Tensor, k: torch.Tensor, num_experts: int) -> torch.Tensor:
    """c = max(floor(L * k / E), 1) per group of tokens (0 for a group with no valid tokens)."""
    c = torch.div(num_valid * k, num_experts, rounding_mode="floor").clamp_min(1)
    return torch.where(num_valid > 0, c, torch.zeros_like(c))


def expert_choice(logits_BLE: torch.Tensor, k_B: Union[int, torch.Tensor],
                  valid_BL: Optional[torch.Tensor] = None, scope: str = "sequence",
                  gate_scaling: Union[bool, str] = False, num_shared: int = 0,
                  batch_capacity: str = "sum", sizes: Optional[tuple] = None) -> Routing:
    """Each expert picks its top-c tokens; gates are a softmax over the experts that picked a token.

    scope="sequence": per sequence b, c_b = max(floor(L_b k_b / E), 1) among its non-pad tokens.
    scope="batch":    one selection over all T tokens, c = max(floor(sum_b L_b k_b / E), 1), or with
                      batch_capacity="reference_max" EC-DLM's max(floor(sum_b L_b max_b k_b / E), 1)
                      (= floor(B L max_b k_b / E) without pads: more FLOPs than the schedule's E[k]).
    gate_scaling: off/False, rms/True or reference (see gate_scale_table); num_shared is S there.
    An int k with no pad mask is the static case: C follows from shapes, with no host sync.
    Otherwise the selection's sizes are host ints, `sizes` = ec_sizes(...) if the caller read them
    already (a model reads them once for all its layers), else read here in one host sync.
    """
    B, L, E = logits_BLE.shape
    dev = logits_BLE.device
    static = valid_BL is None and isinstance(k_B, int)
    scores_BLE = at_least_fp32(logits_BLE)
    if valid_BL is not None:   # pads can never win a top-c
        scores_BLE = scores_BLE.masked_fill(~valid_BL[..., None], float("-inf"))
    L_B = valid_BL.sum(1).long() if valid_BL is not None else torch.full((B,), L, device=dev)
    k_static = k_B if static else None   # stays a Python int: reading it back would sync
    k_B = (torch.full((B,), k_B, dtype=torch.long, device=dev) if isinstance(k_B, int)
           else k_B.to(dev).long().expand(B))

    if not static and sizes is None:
        sizes = ec_sizes(L_B, k_B, E, scope, batch_capacity)
    if scope == "sequence":
        idx_EC = _per_sequence_topc(scores_BLE, L_B, k_B, k_static, sizes)
    elif scope == "batch":
        c = max(B * L * k_static // E, 1) if static else sizes[1]
        idx_EC = scores_BLE.reshape(B * L, E).t().topk(c, dim=-1, sorted=False).indices   # [E, C]
    else:
        raise ValueError(f"ec_scope={scope!r} must be 'sequence' or 'batch'")

    gate_EC, picked_T = sparse_softmax_gates(scores_BLE.reshape(B * L, E), idx_EC, gate_scaling, num_shared)
    unrouted_T = picked_T == 0
    if valid_BL is not None:
        unrouted_T &= valid_BL.reshape(-1)
    n_valid = L_B.sum()
    return Routing(token_idx=idx_EC, gate=gate_EC, shape=(B, L), num_experts=E, capacity_static=static,
                   tokens_per_expert=torch.full((E,), float(idx_EC.shape[1]), device=dev),
                   drop_frac=unrouted_T.sum() / n_valid.clamp_min(1), num_valid_tokens=n_valid)


def ec_sizes(L_B: torch.Tensor, k_B: torch.Tensor, num_experts: int, scope: str = "sequence",
             batch_capacity: str = "sum") -> tuple:
    """(c_max, C) as host ints, read in one host sync: the largest per-sequence capacity and the
    slots per expert (scope sequence: sum_b c_b; batch: c_max = C = the one capacity). A selection
    whose capacities depend on data needs them as shapes."""
    if scope == "sequence":
        c_B = ec_capacity(L_B, k_B, num_experts)
        c_max, C = torch.stack([c_B.max(), c_B.sum()]).tolist()
        return c_max, C
    if scope != "batch":
        raise ValueError(f"ec_scope={scope!r} must be 'sequence' or 'batch'")
    if batch_capacity == "reference_max":
        c = int(ec_capacity(L_B.sum() * k_B.max(), 1, num_experts))
    elif batch_capacity == "sum":
        c = int(ec_capacity((L_B * k_B).sum(), 1, num_experts))
    else:
        raise ValueError(f"batch_capacity={batch_capacity!r} must be 'sum' or 'reference_max'")
    return c, c


def _per_sequence_topc(scores_BLE: torch.Tensor, L_B: torch.Tensor, k_B: torch.Tensor,
                       k_static: Optional[int], sizes: Optional[tuple] = None) -> torch.Tensor:
    """[E, C] flat token indices, C = sum_b c_b: expert e's picks from every sequence, in order."""
    B, L, E = scores_BLE.shape
    offset_B11 = (torch.arange(B, device=scores_BLE.device) * L)[:, None, None]
    if k_static is not None:   # every sequence has the same c: one topk, no host sync
        c = max(L * k_static // E, 1)
        tok_BEc = scores_BLE.transpose(1, 2).topk(c, dim=-1, sorted=False).indices + offset_B11
        return tok_BEc.permute(1, 0, 2).reshape(E, B * c)                       # [E, B*c]
    c_B = ec_capacity(L_B, k_B, E)
    # shapes depend on the capacities: their max and sum, host ints from ec_sizes
    c_max, C = sizes if sizes is not None else ec_sizes(L_B, k_B, E)
    # sorted, so the first c_b of the c_max candidates are sequence b's top c_b
    tok_BEc = scores_BLE.transpose(1, 2).topk(c_max, dim=-1, sorted=True).indices + offset_B11
    keep_Bc = torch.arange(c_max, device=c_B.device)[None, :] < c_B[:, None]
    # the kept columns in order, with C known: a stable sort puts them first (a boolean index
    # would read the count back a second time)
    cols = torch.argsort((~keep_Bc).reshape(-1).to(torch.int32), stable=True)[:C]
    return tok_BEc.permute(1, 0, 2).reshape(E, B * c_max).index_select(1, cols)    # [E, sum_b c_b]


def count_per_index(idx: torch.Tensor, size: int) -> torch.Tensor:
    """bincount with a fixed length: CUDA's bincount reads max(idx) back to size its output."""
    return torch.zeros(size, dtype=torch.long, device=idx.device).index_add_(0, idx, torch.ones_like(idx))


def sparse_softmax_gates(scores_TE: torch.Tensor, idx_EC: torch.Tensor,
                         gate_scaling: Union[bool, str] = False,
                         num_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate of token i for a picking expert j = softmax of S_i over the experts that picked i.

    Computed on the E*C picked scores alone (per-token max by scatter_reduce, per-token sum by
    index_add), not on a dense [T, E] mask: E*C = T*k entries instead of T*E, forward and backward.
    Returns gates [E, C] and the number of experts that picked each token [T].
    """
    T, E = scores_TE.shape
    tok = idx_EC.reshape(-1)
    expert = torch.arange(E, device=tok.device).repeat_interleave(idx_EC.shape[1])
    s = scores_TE.reshape(-1)[tok * E + expert]                     # picked scores, flat [E*C]
    # softmax is shift-invariant: the per-token max only keeps exp() finite, so it needs no gradient
    max_T = s.new_full((T,), float("-inf")).scatter_reduce_(0, tok, s.detach(), "amax")
    ex = torch.exp(s - max_T[tok])
    sum_T = ex.new_zeros(T).index_add_(0, tok, ex)
    gate_EC = (ex / sum_T[tok]).view_as(idx_EC)
    n_T = count_per_index(tok, T)
    method = gate_scaling_method(gate_scaling)
    if method != "off":
        table = gate_scale_table(E, device=gate_EC.device, method=method, num_shared=num_shared)
        gate_EC = gate_EC * table[n_T[idx_EC]]
    return gate_EC, n_T


def gate_scaling_method(gate_scaling: Union[bool, str]) -> str:
    """off, rms or reference; the old boolean reads false/true as off/rms."""
    if isinstance(gate_scaling, bool):
        return "rms" if gate_scaling else "off"
    if gate_scaling not in GATE_SCALINGS:
        raise ValueError(f"gate_scaling={gate_scaling!r} must be one of {', '.join(GATE_SCALINGS)}")
    return gate_scaling


GATE_SCALINGS = ("off", "rms", "reference")


@functools.lru_cache(maxsize=8)
def _gate_scale_table_cpu(num_experts: int, samples: int = 2048, seed: int = 0) -> torch.Tensor:
    """f(n) = E[sum_j g_j^2]^(-1/2) for g = softmax of n standard-normal router logits.

    A token picked by n experts gets a convex mix of n expert outputs, whose norm shrinks like
    the gates' L2 norm (about 1/sqrt(n) for similar logits). Scaling by f(n) restores the norm of
    a single expert's output, so heavily-picked tokens are not systematically damped. Estimated
    once by Monte Carlo (fixed seed, so every rank and run gets the same table) and cached.
    """
    g = torch.Generator().manual_seed(seed)
    f = torch.ones(num_experts + 1, dtype=torch.float32)
    for n in range(2, num_experts + 1):
        gates = torch.softmax(torch.randn(samples, n, generator=g), dim=-1)
        f[n] = gates.pow(2).sum(-1).mean().rsqrt()
    return f


@functools.lru_cache(maxsize=8)
def _reference_gate_scale_table_cpu(num_experts: int, num_shared: int, samples: int = 2048,
                                    seed: int = 0) -> torch.Tensor:
    """EC-DLM's f(n) = sqrt(S) * E[1 / ||softmax(z_1..z_n)||_2], z standard normal, S shared experts.

    Two differences from the rms table: the mean is taken of 1/||g|| rather than of ||g||^2 before
    the inverse root (Jensen: this one is 1-3.5% larger at n = 8), and the sqrt(S) factor puts the
    routed output on the scale of the S shared experts' summed output. f(1) = sqrt(S). Same seeded
    Monte Carlo and cache as the rms table, so every rank and run agrees.
    """
    g = torch.Generator().manual_seed(seed)
    f = torch.full((num_experts + 1,), math.sqrt(num_shared), dtype=torch.float32)
    for n in range(2, num_experts + 1):
        gates = torch.softmax(torch.randn(samples, n, generator=g, dtype=torch.float64), dim=-1)
        f[n] = math.sqrt(num_shared) * float(gates.norm(dim=-1).reciprocal().mean())
    return f


def gate_scale_table(num_experts: int, device=None, method: str = "rms", num_shared: int = 0) -> torch.Tensor:
    """f(n) for n = 0..num_experts experts picking a token: method rms (ecdlm) or reference (EC-DLM)."""
    if method == "reference":
        return _reference_gate_scale_table_cpu(num_experts, num_shared).to(device)
    if method != "rms":
        raise ValueError(f"gate scale table method={method!r} must be rms or reference")
    return _gate_scale_table_cpu(num_experts).to(device)


# ---- token choice --------------------------------------------------------------------------------
def token_choice(logits_TE: torch.Tensor, k: int, capacity_factor: Optional[float] = None, *,
                 score_fn: str = "softmax", renormalize: bool = True,
                 expert_bias: Optional[torch.Tensor] = None, bias_in_gates: bool = False,
                 valid_T: Optional[torch.Tensor] = None) -> Routing:
    """Each token picks its top-k experts (the autoregressive-MoE baseline).

    `expert_bias` [E] is added to the scores for *selection only* (aux-loss-free balancing); gates
    use the unbiased scores, unless `bias_in_gates`: then the biased sums are the gates too, as in
    LLaDA-MoE's released router (softmax + expert_bias, top-k on the sum). With `capacity_factor`,
    expert e keeps at most C = ceil(T k / E * cf) assignments, dropping those with the lowest scores; None is dropless.
    """
    T, E = logits_TE.shape
    dev = logits_TE.device
    probs_TE = token_scores(logits_TE, score_fn)
    select_TE = probs_TE if expert_bias is None else probs_TE + expert_bias.to(probs_TE)
    top_Tk = select_TE.topk(k, dim=-1).indices
    w_Tk = (select_TE if bias_in_gates else probs_TE).gather(1, top_Tk)
    if renormalize:
        w_Tk = w_Tk / w_Tk.sum(-1, keepdim=True).clamp_min(1e-20)

    expert_N = top_Tk.reshape(-1)
    token_N = torch.arange(T, device=dev).repeat_interleave(k)
    w_N, score_N = w_Tk.reshape(-1), select_TE.gather(1, top_Tk).reshape(-1).detach()
    if valid_T is not None:   # pads route nowhere: send them to a sentinel expert E, then drop
        expert_N = torch.where(valid_T.repeat_interleave(k), expert_N, torch.full_like(expert_N, E))
    load_E = count_per_index(expert_N, E + 1)[:E]
    n_valid = valid_T.sum() if valid_T is not None else torch.full((), T, dtype=torch.long, device=dev)
    common = dict(shape=(T,), num_experts=E, tokens_per_expert=load_E.float(), num_valid_tokens=n_valid)

    if capacity_factor is None:
        n = T * k if valid_T is None else int(load_E.sum())   # with pads, a host sync
        order = torch.argsort(expert_N, stable=True)[:n]   # sentinel sorts last
        return Routing(token_idx=token_N[order], gate=w_N[order], counts=load_E,
                       drop_frac=torch.zeros((), device=dev), **common)

    C = math.ceil(T * k / E * capacity_factor)
    # order by expert, and by descending score within an expert, so rank < C keeps the best
    by_score = torch.argsort(score_N, descending=True, stable=True)
    order = by_score[torch.argsort(expert_N[by_score], stable=True)]
    e_sorted = expert_N[order]
    start_E = torch.cumsum(load_E, 0) - load_E
    rank = torch.arange(order.numel(), device=dev) - torch.cat([start_E, start_E.new_zeros(1)])[e_sorted]
    keep = (rank < C) & (e_sorted < E)
    # dropped assignments write to one extra slot, cut off below: fixed shapes, no host sync (a
    # boolean index would read its count back); the cut slot's gradient is zero
    slot = torch.where(keep, e_sorted * C + rank, E * C)
    idx_EC = torch.zeros(E * C + 1, dtype=torch.long, device=dev).index_put_((slot,), token_N[order])
    gate_EC = torch.zeros(E * C + 1, dtype=w_N.dtype, device=dev).index_put((slot,), w_N[order])
    valid_EC = torch.zeros(E * C + 1, dtype=torch.bool, device=dev).index_put_((slot,), keep)
    dropped = load_E.sum() - keep.sum()
    return Routing(token_idx=idx_EC[:E * C].view(E, C), gate=gate_EC[:E * C].view(E, C),
                   slot_valid=valid_EC[:E * C].view(E, C),
                   capacity_static=True, drop_frac=dropped / load_E.sum().clamp_min(1), **common)


def token_scores(logits_TE: torch.Tensor, score_fn: str) -> torch.Tensor:
    logits_TE = at_least_fp32(logits_TE)
    if score_fn == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    if score_fn == "sigmoid":
        return torch.sigmoid(logits_TE)
    raise ValueError(f"score_fn={score_fn!r} must be 'softmax' or 'sigmoid'")


# ---- auxiliary losses and balancing --------------------------------------------------------------
def z_loss(logits_TE: torch.Tensor, valid_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over (valid) tokens of logsumexp(S_i)^2: keeps router logits from drifting large."""
    lse2_T = torch.logsumexp(at_least_fp32(logits_TE), dim=-1).pow(2)
    if valid_T is None:
        return lse2_T.mean()
    return (lse2_T * valid_T).sum() / valid_T.sum().clamp_min(1)


def switch_aux_loss(probs_TE: torch.Tensor, routing: Routing,
                    valid_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch-Transformer balance loss E * sum_e f_e P_e; equals 1 when perfectly uniform.

    f_e: fraction of top-k assignments to expert e (before drops; not differentiable);
    P_e: mean routing probability of expert e (differentiable).
    """
    E = probs_TE.shape[-1]
    probs_TE = probs_TE / probs_TE.sum(-1, keepdim=True)   # sigmoid scores: normalize first
    load_E = routing.tokens_per_expert
    f_E = load_E / load_E.sum().clamp_min(1)
    if valid_T is None:
        P_E = probs_TE.mean(0)
    else:
        P_E = (probs_TE * valid_T[:, None]).sum(0) / valid_T.sum().clamp_min(1)
    return E * (f_E.detach() * P_E).sum()


def update_expert_bias(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing: b_e += rate * sign(mean load - load_e), once per optimizer step.

    `load_E` must be the same on every rank (summed over micro-batches and data-parallel ranks),
    so that every copy of the bias stays identical.
    """
    load_E = load_E.to(bias_E)
    bias_E.add_(rate * torch.sign(load_E.mean() - load_E))
