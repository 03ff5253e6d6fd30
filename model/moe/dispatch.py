"""All communication of an MoE layer, behind one dispatch() / experts_then_combine() interface.

    dispatch:             gather each expert's tokens (x_TD -> per-expert rows) and, under expert
                          parallelism, all-to-all them to the rank that holds the expert;
    experts_then_combine: the experts on those rows, the reverse all-to-all, then gate-weighted
                          scatter-add back to token order (combine() is that last part alone).

Three exchanges under expert parallelism, all with sizes known before any data moves except
the ragged one:
  - fixed-capacity slots (EC, TC with a capacity factor): one row per slot. A rank's rows for
    its own experts never travel; the combine is pipelined: the other sources' rows go through
    the experts first and travel back while the own rows go through.
  - each token once per rank (fixed capacity with El * C > T, i.e. k > ep): every token goes to
    every rank once, with its slots' indices and gates; expert outputs are summed per token
    there, and one row per token comes back (k / ep fewer bytes each way).
  - ragged (TC dropless): counts first, then rows.

Gates: in one process the gate travels with its row in `ExpertBatch.gate`; MoELayer's experts
apply it to their hidden activation ([.., H] wide rather than [.., D]: half the memory traffic)
and clear it; combine() applies whatever gate is still pending, so a caller that ignores gates
gets the same result. On the slot and ragged paths the gate never leaves the token's rank: it is
applied to the returned rows there. That saves one all-to-all per dispatch in the forward and
one in the backward (a third of the layer's collectives), at the cost of a [.., D] multiply. On
the once-per-rank path the gates travel ([El, C] floats), since the sums are made remotely.

`LocalDispatcher` is the one-process case. `AllToAllDispatcher` takes its process group as an
argument (no globals), so it can be tested on gloo with two processes.

Legend: T tokens, E global experts, El local experts, C slots per expert, N ragged rows, D dim.
Global expert e lives on rank e // El, so each rank's experts are one contiguous block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist

from .routing import Routing


@dataclass
class FixedExchange:
    """What the experts and combine() need after a fixed-capacity dispatch: the local capacity C,
    every rank's capacity, and this rank's own rows for its own experts ([El, C, D]: they never
    travel)."""
    capacity: int
    source_capacities: list
    own: torch.Tensor


@dataclass
class TokenExchange:
    """What the experts and combine need after a once-per-rank dispatch: each other source's slot's
    row in the block of their tokens (by source), T, and this rank's own tokens with its own
    slots' token indices and gates (they never travel)."""
    row_of_slot: torch.Tensor   # [El, sum over other sources of C_p]
    num_tokens: int
    own_tokens: torch.Tensor    # [T, D]
    own_idx: torch.Tensor       # [El, C]
    own_gate: torch.Tensor      # [El, C]


@dataclass
class RaggedExchange:
    """What combine() needs to undo a ragged (TC dropless) dispatch: the rows sent to and received
    from each rank, and the permutation that grouped the received rows by local expert."""
    send: list
    recv: list
    perm: torch.Tensor


@dataclass
class ExpertBatch:
    """Rows for this rank's experts: x is [El, C, D] (fixed capacity) or [N, D] with counts [El]."""
    x: torch.Tensor
    counts: Optional[torch.Tensor] = None
    ctx: Union[FixedExchange, TokenExchange, RaggedExchange, None] = None   # None: a one-process dispatch
    gate: Optional[torch.Tensor] = None   # [El, C] or [N]: gates not yet applied to the rows
    overlapped: Any = None   # what dispatch()'s `meanwhile` returned


def gather_tokens(x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Rows of x for every slot: [E, C, D] (fixed) or [N, D] (ragged).

    index_select's backward is an index_add_ into zeros, which on the CPU runs as a parallel
    scatter-add over rows: no need for a hand-written backward."""
    rows = x_TD.index_select(0, routing.token_idx.reshape(-1))
    return rows.view(*routing.token_idx.shape, x_TD.shape[-1])


def scatter_tokens(rows: torch.Tensor, routing: Routing, num_tokens: int) -> torch.Tensor:
    """out_TD[t] = sum of the (already gate-weighted) rows of token t's slots; padding slots
    point at token 0 and carry zero rows (gate 0)."""
    D = rows.shape[-1]
    out = rows.new_zeros(num_tokens, D)
    return out.index_add_(0, routing.token_idx.reshape(-1), rows.reshape(-1, D))


def times_gate(rows: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Each row ([.., D]) scaled by its gate ([..])."""
    return rows * gate.to(rows.dtype).unsqueeze(-1)


def gated_rows(y: ExpertBatch) -> torch.Tensor:
    """y.x times the gates that are still pending (none after MoELayer's experts)."""
    return y.x if y.gate is None else times_gate(y.x, y.gate)


class LocalDispatcher:
    """All experts on this process: dispatch is a gather, combine a weighted scatter-add."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, meanwhile: Optional[Callable] = None) -> ExpertBatch:
        return ExpertBatch(gather_tokens(x_TD, routing), routing.counts, gate=routing.gate,
                           overlapped=meanwhile() if meanwhile else None)

    def combine(self, y: ExpertBatch, routing: Routing) -> torch.Tensor:
        return scatter_tokens(gated_rows(y), routing, routing.num_tokens)

    def experts_then_combine(self, y: ExpertBatch, routing: Routing, experts: Callable) -> torch.Tensor:
        """experts(rows [E, C, D], gate [E, C] or None) on the dispatched rows, then combine."""
        return apply_then_combine(self, y, routing, experts)


def apply_then_combine(dispatcher, y: ExpertBatch, routing: Routing, experts: Callable) -> torch.Tensor:
    """The unpipelined order: every row through the experts (which apply the pending gates), then
    combine."""
    y.x, y.gate = experts(y.x, y.gate), None
    return dispatcher.combine(y, routing)


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single on dim 0; the backward swaps the split sizes."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (in_splits, out_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        in_splits, out_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list, in_splits: list, group) -> torch.Tensor:
    if torch.compiler.is_compiling():   # the traceable form: no graph break (docs/speed.md)
        return traced_all_to_all(x, out_splits, in_splits, group)
    return _AllToAll.apply(x, out_splits, in_splits, group)


def traced_all_to_all(x: torch.Tensor, out_splits: list, in_splits: list, group) -> torch.Tensor:
    """all_to_all_single through torch's functional collectives, which dynamo traces into the
    graph (forward and backward: its backward is the reverse exchange). Used under torch.compile
    only: eager keeps the hand-written Functions, whose async start/wait lets the shared experts
    run while rows travel; in a compiled graph the scheduler decides the order."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
    return wait_tensor(all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


class _InFlight:
    """One overlapped all-to-all: the forward's and the backward's pending work and buffers
    (kept referenced until waited on: the transfer reads and writes them in the background)."""
    work = send = grad_work = grad_in = grad_out = None


class _AllToAllStart(torch.autograd.Function):
    """Starts all_to_all_single(x) and returns the output buffer, still being filled; pass it
    through _AllToAllWait before use. In the backward this node is the wait: _AllToAllWait's
    backward started the reverse exchange, and autograd runs whatever else is ready in between
    (it picks later-created nodes first, i.e. what ran between start and wait in the forward)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, flight):
        ctx.flight = flight
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        flight.send = x.contiguous()
        flight.work = dist.all_to_all_single(out, flight.send, out_splits, in_splits, group=group, async_op=True)
        return out

    @staticmethod
    def backward(ctx, grad_unused):
        f = ctx.flight
        f.grad_work.wait()
        grad_in, f.grad_in, f.grad_out, f.grad_work = f.grad_in, None, None, None
        return grad_in, None, None, None, None


class _AllToAllWait(torch.autograd.Function):
    """Waits for _AllToAllStart's exchange; the backward starts the reverse one."""

    @staticmethod
    def forward(ctx, out, in_splits, out_splits, group, flight):
        flight.work.wait()
        flight.work = flight.send = None
        ctx.args = (in_splits, out_splits, group, flight)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        in_splits, out_splits, group, f = ctx.args
        f.grad_out = grad.contiguous()
        f.grad_in = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        f.grad_work = dist.all_to_all_single(f.grad_in, f.grad_out, in_splits, out_splits, group=group,
                                             async_op=True)
        return grad, None, None, None, None   # only its shape matters: _AllToAllStart returns grad_in


def all_to_all_overlapped(x: torch.Tensor, out_splits: list, in_splits: list, group,
                          meanwhile: Optional[Callable]) -> tuple[torch.Tensor, Any]:
    """all_to_all(x), running meanwhile() while the rows travel, in the forward and (through
    autograd's ordering) its backward while the gradients travel back. Returns (rows, result)."""
    if meanwhile is None or torch.compiler.is_compiling():
        return all_to_all(x, out_splits, in_splits, group), (meanwhile() if meanwhile else None)
    flight = _InFlight()
    out = _AllToAllStart.apply(x, out_splits, in_splits, group, flight)
    result = meanwhile()
    return _AllToAllWait.apply(out, in_splits, out_splits, group, flight), result


class AllToAllDispatcher:
    """Experts split over the ranks of `group` (expert parallelism)."""

    def __init__(self, group, num_experts: int):
        self.group = group
        self.ep = dist.get_world_size(group)
        if num_experts % self.ep:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {self.ep}")
        self.num_local = num_experts // self.ep
        self.rank = dist.get_rank(group)

    # -- fixed capacity (EC, TC with a capacity factor) ----------------------------------------
    def _capacities(self, C: int, static: bool, device) -> list:
        """C of every rank. Ranks must agree on all split sizes before an all-to-all: when C
        follows from shapes (static), every rank already knows it; otherwise one int is exchanged,
        and read back in one host sync (torch.full, not torch.tensor: no blocking upload)."""
        if static:
            return [C] * self.ep
        mine = torch.full((1,), C, dtype=torch.long, device=device)
        every = [torch.empty_like(mine) for _ in range(self.ep)]
        dist.all_gather(every, mine, group=self.group)
        return torch.cat(every).tolist()

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, meanwhile: Optional[Callable] = None) -> ExpertBatch:
        """`meanwhile` (e.g. the shared expert) runs while the rows are in flight."""
        if not routing.fixed:
            return self._dispatch_ragged(x_TD, routing, meanwhile)
        caps = self._capacities(routing.token_idx.shape[1], routing.capacity_static, x_TD.device)
        if self.sends_tokens_once(caps, routing.num_tokens):
            return self._dispatch_tokens(x_TD, routing, caps, meanwhile)
        x_ECD = gather_tokens(x_TD, routing)                               # [E, C, D]
        El, (E, C, D), me = self.num_local, x_ECD.shape, self.rank
        per_rank = x_ECD.view(self.ep, El * C, D).unbind(0)                # rows for rank p's experts
        # this rank's rows for its own experts stay here; the rest travel (nothing sent to self)
        away = [r for p, r in enumerate(per_rank) if p != me]
        send = away[0] if len(away) == 1 else torch.cat(away) if away else x_ECD.new_empty(0, D)   # none at ep=1
        recv, side = all_to_all_overlapped(send, self._not_me([El * c for c in caps]), self._not_me([El * C] * self.ep),
                                           self.group, meanwhile)          # per other source p: [El, C_p, D]
        own = per_rank[me].view(El, C, D)
        return ExpertBatch(recv, ctx=FixedExchange(C, caps, own), overlapped=side)   # gates stay here

    def _not_me(self, sizes: list) -> list:
        """Split sizes with nothing to or from this rank."""
        return [0 if p == self.rank else n for p, n in enumerate(sizes)]

    def experts_then_combine(self, y: ExpertBatch, routing: Routing, experts: Callable) -> torch.Tensor:
        """experts(rows, gate) on the dispatched rows, then combine. On the fixed-capacity slot
        path it is pipelined: the other sources' rows go through the experts first and travel
        back while this rank's own rows (which need no exchange) go through; in the backward,
        their gradients travel while the own rows' backward runs (autograd's ordering, as in
        all_to_all_overlapped). The gates are applied here, on the token's rank, after."""
        if isinstance(y.ctx, TokenExchange):
            return self._experts_then_combine_tokens(y, experts)
        if not isinstance(y.ctx, FixedExchange):
            return apply_then_combine(self, y, routing, experts)
        C, caps, own = y.ctx.capacity, y.ctx.source_capacities, y.ctx.own
        El, D = self.num_local, own.shape[-1]
        others = [c for p, c in enumerate(caps) if p != self.rank]
        rows_back = self._source_major(experts(self._expert_major(y.x, others, D), None), others) if others else y.x
        back, own_out = all_to_all_overlapped(rows_back, self._not_me([El * C] * self.ep),
                                              self._not_me([El * c for c in caps]), self.group,
                                              meanwhile=lambda: experts(own, None))
        parts = list(torch.split(back, El * C))   # per other expert rank
        parts.insert(self.rank, own_out.reshape(El * C, D))
        y_ECD = torch.cat(parts).view(-1, C, D)
        return scatter_tokens(times_gate(y_ECD, routing.gate), routing, routing.num_tokens)

    def _expert_major(self, recv: torch.Tensor, caps: list, D: int) -> torch.Tensor:
        """recv holds, per source rank p (those of `caps`), [El, C_p, D]; each local expert takes
        all sources' rows: [El, sum_p C_p, D]. With equal capacities that is one transpose copy
        (forward and backward; none for one source); split + cat would copy twice in the backward."""
        El, n = self.num_local, len(caps)
        if len(set(caps)) == 1:
            return recv.view(n, El, caps[0], D).transpose(0, 1).reshape(El, n * caps[0], D)
        parts = torch.split(recv, [El * c for c in caps])
        return torch.cat([p.view(El, c, D) for p, c in zip(parts, caps)], dim=1)

    def _source_major(self, rows: torch.Tensor, caps: list) -> torch.Tensor:
        """The inverse of _expert_major: [El, sum_p C_p, D] -> per destination rank p, [El, C_p, D]."""
        El, _, D = rows.shape
        if len(set(caps)) == 1:
            return rows.view(El, len(caps), caps[0], D).transpose(0, 1).reshape(-1, D)
        return torch.cat([part.reshape(-1, D) for part in torch.split(rows, caps, dim=1)])

    # -- each token once per destination rank (fixed capacity, El * C > T) --------------------
    def sends_tokens_once(self, caps: list, num_tokens: int) -> bool:
        """Whether to send every token once to every rank instead of one row per slot: fewer
        bytes when a rank's experts take more slots than there are tokens (El * C > T, i.e.
        k > ep on average), as with fine-grained experts (k = 8 at ep = 2: 4x fewer). Decided
        from every rank's capacity (and T, equal on all ranks), so every rank agrees, and every
        buffer size stays known in advance. Never at one rank, where the slot path sends nothing."""
        return self.ep > 1 and self.num_local * sum(caps) > self.ep * num_tokens

    def _dispatch_tokens(self, x_TD: torch.Tensor, routing: Routing, caps: list,
                         meanwhile: Optional[Callable]) -> ExpertBatch:
        """All of this rank's T tokens go to every other rank (T rows per pair, where the slot
        path sends El * C), with each slot's token index and gate for that rank's experts
        (small). A destination gathers its experts' rows from the block of the other sources'
        tokens and from its own tokens, which never travel; see experts_then_combine."""
        T, D = x_TD.shape
        El, ep, me, (E, C) = self.num_local, self.ep, self.rank, routing.token_idx.shape
        tokens = self._not_me([T] * ep)
        x_other, side = all_to_all_overlapped(x_TD.expand(ep - 1, T, D).reshape(-1, D), tokens, tokens,
                                              self.group, meanwhile)          # [(ep-1) T, D], by source
        out_splits, in_splits = [El * c for c in caps], [El * C] * ep
        if torch.compiler.is_compiling():
            idx = traced_all_to_all(routing.token_idx.reshape(-1), out_splits, in_splits, self.group)
        else:
            idx = torch.empty(sum(out_splits), dtype=routing.token_idx.dtype, device=x_TD.device)
            dist.all_to_all_single(idx, routing.token_idx.reshape(-1), out_splits, in_splits, group=self.group)
        gate = all_to_all(routing.gate.reshape(-1), out_splits, in_splits, self.group)
        idx_p, gate_p = torch.split(idx, out_splits), torch.split(gate, out_splits)
        # the other sources' slots point at their tokens: rows j*T.. of x_other for the j-th of them
        others = [p for p in range(ep) if p != me]
        row = torch.cat([idx_p[p] + j * T for j, p in enumerate(others)]).unsqueeze(-1)
        other_caps = [caps[p] for p in others]
        row_of_slot = self._expert_major(row, other_caps, 1).squeeze(-1)            # [El, sum_p C_p]
        gate_other = self._expert_major(torch.cat([gate_p[p] for p in others]).unsqueeze(-1), other_caps, 1)
        x_ECD = x_other.index_select(0, row_of_slot.reshape(-1)).view(*row_of_slot.shape, D)
        ctx = TokenExchange(row_of_slot, T, x_TD, idx_p[me].view(El, C), gate_p[me].view(El, C))
        return ExpertBatch(x_ECD, ctx=ctx, gate=gate_other.squeeze(-1), overlapped=side)

    def _experts_then_combine_tokens(self, y: ExpertBatch, experts: Callable) -> torch.Tensor:
        """The other sources' slots through the experts, their gated outputs summed per token and
        sent back (one row per token), while this rank's own slots go through; then every rank's
        sums for this rank's tokens, added up."""
        ctx, D = y.ctx, y.x.shape[-1]
        row_of_slot, T = ctx.row_of_slot, ctx.num_tokens
        out = experts(y.x, y.gate)
        sums = out.new_zeros((self.ep - 1) * T, D).index_add_(0, row_of_slot.reshape(-1), out.reshape(-1, D))
        tokens = self._not_me([T] * self.ep)

        def own_sums():
            idx = ctx.own_idx.reshape(-1)
            rows = experts(ctx.own_tokens.index_select(0, idx).view(*ctx.own_idx.shape, D), ctx.own_gate)
            return rows.new_zeros(T, D).index_add_(0, idx, rows.reshape(-1, D))
        back, mine = all_to_all_overlapped(sums, tokens, tokens, self.group, meanwhile=own_sums)
        return back.view(self.ep - 1, T, D).sum(0) + mine

    def combine(self, y: ExpertBatch, routing: Routing) -> torch.Tensor:
        if not routing.fixed:
            return self._combine_ragged(y, routing)
        raise ValueError("a fixed-capacity dispatch is combined by experts_then_combine()")

    # -- ragged (TC dropless): counts first, then rows ----------------------------------------
    def _dispatch_ragged(self, x_TD: torch.Tensor, routing: Routing, meanwhile: Optional[Callable]) -> ExpertBatch:
        El, ep = self.num_local, self.ep
        x_ND = gather_tokens(x_TD, routing)
        counts_recv = torch.empty_like(routing.counts)        # [ep * El]: per source, per local expert
        dist.all_to_all_single(counts_recv, routing.counts, group=self.group)
        recv_counts_pe = counts_recv.view(ep, El)
        # the split sizes both ways in one host sync: the layer's only one
        send, recv = torch.stack([routing.counts.view(ep, El).sum(1), recv_counts_pe.sum(1)]).tolist()
        rows, side = all_to_all_overlapped(x_ND, recv, send, self.group, meanwhile)   # by (source, local expert)
        expert_of_row = torch.repeat_interleave(torch.arange(El, device=rows.device).repeat(ep),
                                                recv_counts_pe.reshape(-1), output_size=sum(recv))
        perm = torch.argsort(expert_of_row, stable=True)         # regroup by local expert
        return ExpertBatch(rows[perm], recv_counts_pe.sum(0), ctx=RaggedExchange(send, recv, perm), overlapped=side)

    def _combine_ragged(self, y: ExpertBatch, routing: Routing) -> torch.Tensor:
        send, recv, perm = y.ctx.send, y.ctx.recv, y.ctx.perm
        rows = gated_rows(y)
        rows = torch.empty_like(rows).index_copy(0, perm, rows)  # undo the regrouping
        y_ND = all_to_all(rows, send, recv, self.group)
        return scatter_tokens(times_gate(y_ND, routing.gate), routing, routing.num_tokens)
