"""Routed SwiGLU experts stored as stacked weights, plus the dense SwiGLU used for shared experts
and non-MoE layers.

Legend: E local experts, C slots per expert, N ragged rows, D model dim, H expert hidden,
F = 2H (gate and up projections fused into one matmul).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def compiling() -> bool:
    """Whether torch.compile is tracing this call. Traced code takes plain differentiable ops
    where inductor does better with them: the hand-written _SwiGLU (out= into non-contiguous
    views) saves eager memory and passes, but dynamo cannot trace its backward (a graph break),
    and inductor fuses the plain ops itself. The fused one-process expert node is a custom
    operator instead, which dynamo keeps whole (see local_fixed_experts). Same math either way
    (docs/speed.md)."""
    return torch.compiler.is_compiling()


def swiglu(h_xF: torch.Tensor, gate_x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(h1) * h2 for h = [h1 | h2], times a per-row routing gate if one is given."""
    if compiling():
        h1, h2 = h_xF.chunk(2, dim=-1)
        out = F.silu(h1) * h2
        return out if gate_x is None else out * gate_x.to(out.dtype).unsqueeze(-1)
    return _SwiGLU.apply(h_xF, gate_x)


class _SwiGLU(torch.autograd.Function):
    """SwiGLU activation with an optional per-row gate, and a hand-written backward.

    Why not plain autograd: (1) autograd's backward of `chunk` concatenates the two halves of
    dh, one more pass over the widest activation [.., 2H]; here both halves are written straight
    into one buffer, which also serves as the scratch space for the gate's gradient. (2) Scaling
    by the routing gate here, on [.., H], instead of on the expert output [.., D] in combine,
    halves the gate's forward and backward passes (D = 2H in our configs). (3) No temporaries
    beyond the output and dh: on the CPU every fresh tensor of 32 MB or more is page-faulted in
    (glibc mmaps such blocks and unmaps them when freed), at about 0.25 ms per MB on our test
    machine, more than a pass over the data costs.
    """

    @staticmethod
    def forward(ctx, h, gate):
        out, s = _swiglu_forward(h, gate)
        ctx.save_for_backward(h, s, gate)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h, s, gate = ctx.saved_tensors
        return _swiglu_backward(grad, h, s, gate, ctx.needs_input_grad[1])


def _swiglu_forward(h, gate, s_out=None):
    """(silu(h1) * h2 [* gate], silu(h1)); silu(h1) written into s_out if given."""
    h1, h2 = h.chunk(2, dim=-1)
    s = F.silu(h1) if s_out is None else torch.ops.aten.silu.out(h1, out=s_out)
    out = s * h2
    if gate is not None:
        out.mul_(gate.to(out.dtype).unsqueeze(-1))
    return out, s


def _swiglu_backward(grad, h, s, gate, need_grad_gate: bool):
    """(dL/dh, dL/dgate) from dL/dout; dL/dgate is None unless gated and asked for."""
    h1, h2 = h.chunk(2, dim=-1)
    grad_h = torch.empty_like(h)
    gh1, gh2 = grad_h.chunk(2, dim=-1)
    torch.mul(grad, h2, out=gh1)                       # dL/ds before the gate
    grad_gate = None
    if gate is not None:
        if need_grad_gate:   # dL/dgate = sum_H grad * s * h2, with gh2 as scratch
            grad_gate = torch.mul(gh1, s, out=gh2).sum(-1).to(gate.dtype)
        gate_col = gate.to(grad.dtype).unsqueeze(-1)
        gh1.mul_(gate_col)
        torch.mul(grad, s, out=gh2).mul_(gate_col)     # dL/dh2
    else:
        torch.mul(grad, s, out=gh2)
    torch.ops.aten.silu_backward.grad_input(gh1, h1, grad_input=gh1)   # dL/dh1, in place
    return grad_h, grad_gate


def _local_fixed_forward(x_TD, idx_EC, gate_EC, w_in_EDF, w_out_EHD):
    """gather -> x @ w_in -> gated SwiGLU -> @ w_out -> scatter-add, one group of experts at a
    time: (out [T, D], and what the backward keeps: h [E, C, 2H], s [E, C, H]).

    The same math as LocalDispatcher.dispatch + Experts.forward_fixed + combine, for the common
    case (every expert on this process, the same C rows each). Only h = x @ w_in and
    s = silu(h1) are kept for the backward, the two tensors the floor (a dense SwiGLU of the
    same width) keeps too. The gathered rows, the expert outputs, the activation a = s * h2 * g,
    the output-gradient rows, dL/da, dL/dh and the dL/dx rows are made one group of experts at a
    time, small, and reused: the backward gathers its group's input rows again and recomputes a
    from s, h2 and g (one cheap pass each) instead of keeping [E, C, D] and [E, C, H] copies.
    That halves the layer's saved activations, and on a CPU it avoids page faults: glibc mmaps
    every fresh block of 32 MB or more and unmaps it when freed, so each such tensor is
    page-faulted in anew, at ~0.25 ms per MB on our test machine, more than a pass over the data
    costs; small blocks come from the heap and are reused (benchmarks/README.md). On a GPU the
    caching allocator makes fresh tensors free, so there it is one group.
    """
    (E, C), (D, F2) = idx_EC.shape, w_in_EDF.shape[1:]
    h_ECF = x_TD.new_empty(E, C, F2)
    s_ECH = x_TD.new_empty(E, C, F2 // 2)
    out_TD = x_TD.new_zeros(x_TD.shape)
    for g in _expert_groups(E, C, max(D, F2), x_TD):
        idx = idx_EC[g].reshape(-1)
        x_gCD = x_TD.index_select(0, idx).view(-1, C, D)                        # dispatch
        torch.bmm(x_gCD, w_in_EDF[g], out=h_ECF[g])
        a_gCH = _swiglu_forward(h_ECF[g], gate_EC[g] if gate_EC is not None else None, s_out=s_ECH[g])[0]
        out_TD.index_add_(0, idx, torch.bmm(a_gCH, w_out_EHD[g]).view(-1, D))    # combine
    return out_TD, h_ECF, s_ECH


def _local_fixed_backward(grad_TD, x_TD, h_ECF, s_ECH, idx_EC, gate_EC, w_in_EDF, w_out_EHD, need_gate: bool):
    """(dL/dx, dL/dgate or None, dL/dw_in, dL/dw_out) of _local_fixed_forward, group by group."""
    (E, C), D = idx_EC.shape, x_TD.shape[-1]
    grad_x = grad_TD.new_zeros(grad_TD.shape)
    grad_w_in, grad_w_out = torch.empty_like(w_in_EDF), torch.empty_like(w_out_EHD)
    grad_gate = torch.empty_like(gate_EC) if need_gate and gate_EC is not None else None
    for g in _expert_groups(E, C, max(D, h_ECF.shape[-1]), x_TD):
        idx = idx_EC[g].reshape(-1)
        h_gCF, s_gCH, gate_gC = h_ECF[g], s_ECH[g], (gate_EC[g] if gate_EC is not None else None)
        rows_gCD = grad_TD.index_select(0, idx).view(-1, C, D)                    # dL/dy
        a_gCH = torch.mul(s_gCH, h_gCF.chunk(2, dim=-1)[1])                         # recomputed
        if gate_gC is not None:
            a_gCH.mul_(gate_gC.to(a_gCH.dtype).unsqueeze(-1))
        torch.bmm(a_gCH.transpose(1, 2), rows_gCD, out=grad_w_out[g])
        grad_a = torch.bmm(rows_gCD, w_out_EHD[g].transpose(1, 2), out=a_gCH)     # a is spent
        grad_h, grad_gate_g = _swiglu_backward(grad_a, h_gCF, s_gCH, gate_gC, need_gate)
        if grad_gate is not None:
            grad_gate[g] = grad_gate_g
        x_gCD = torch.index_select(x_TD, 0, idx, out=rows_gCD.view(-1, D)).view(-1, C, D)  # gathered again
        torch.bmm(x_gCD.transpose(1, 2), grad_h, out=grad_w_in[g])
        torch.bmm(grad_h, w_in_EDF[g].transpose(1, 2), out=rows_gCD)              # dL/dx rows
        grad_x.index_add_(0, idx, rows_gCD.view(-1, D))
    return grad_x, grad_gate, grad_w_in, grad_w_out


# The fused node as two custom operators (forward, backward) with a registered autograd formula.
# Eager calls them like any op; torch.compile keeps each as one opaque call in its graph (no
# graph break, fullgraph holds). Why opaque under compile on the CPU: inductor's own code for
# the same gather, bmm's, SwiGLU and index_add measured 15% slower than this node on the layer
# benchmark's shape (docs/speed.md), since its fresh [E, C, *] buffers are page-faulted in.
@torch.library.custom_op("ecdlm::local_fixed_experts", mutates_args=())
def local_fixed_experts(x_TD: torch.Tensor, idx_EC: torch.Tensor, gate_EC: Optional[torch.Tensor],
                        w_in_EDF: torch.Tensor, w_out_EHD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _local_fixed_forward(x_TD, idx_EC, gate_EC, w_in_EDF, w_out_EHD)


@local_fixed_experts.register_fake
def _(x_TD, idx_EC, gate_EC, w_in_EDF, w_out_EHD):
    (E, C), F2 = idx_EC.shape, w_in_EDF.shape[-1]
    return x_TD.new_empty(x_TD.shape), x_TD.new_empty(E, C, F2), x_TD.new_empty(E, C, F2 // 2)


@torch.library.custom_op("ecdlm::local_fixed_experts_backward", mutates_args=())
def local_fixed_experts_backward(grad_TD: torch.Tensor, x_TD: torch.Tensor, h_ECF: torch.Tensor,
                                 s_ECH: torch.Tensor, idx_EC: torch.Tensor, gate_EC: Optional[torch.Tensor],
                                 w_in_EDF: torch.Tensor, w_out_EHD: torch.Tensor,
                                 need_gate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gx, gg, gwi, gwo = _local_fixed_backward(grad_TD.contiguous(), x_TD, h_ECF, s_ECH, idx_EC, gate_EC,
                                             w_in_EDF, w_out_EHD, need_gate)
    return gx, (gg if gg is not None else x_TD.new_empty(0)), gwi, gwo   # an op returns tensors


@local_fixed_experts_backward.register_fake
def _(grad_TD, x_TD, h_ECF, s_ECH, idx_EC, gate_EC, w_in_EDF, w_out_EHD, need_gate):
    gg = gate_EC.new_empty(gate_EC.shape) if need_gate and gate_EC is not None else x_TD.new_empty(0)
    return x_TD.new_empty(x_TD.shape), gg, w_in_EDF.new_empty(w_in_EDF.shape), w_out_EHD.new_empty(w_out_EHD.shape)


def _fused_setup(ctx, inputs, output):
    x_TD, idx_EC, gate_EC, w_in_EDF, w_out_EHD = inputs
    ctx.save_for_backward(x_TD, output[1], output[2], idx_EC, gate_EC, w_in_EDF, w_out_EHD)
    ctx.mark_non_differentiable(output[1], output[2])   # kept for the backward, never used on:
    ctx.set_materialize_grads(False)                     # no [E, C, *] zeros for their gradients
    ctx.need_gate = gate_EC is not None and gate_EC.requires_grad


def _fused_backward(ctx, grad_TD, grad_h_unused, grad_s_unused):
    if grad_TD is None:   # not materialized: the output took no part in the loss
        return None, None, None, None, None
    x_TD, h_ECF, s_ECH, idx_EC, gate_EC, w_in_EDF, w_out_EHD = ctx.saved_tensors
    gx, gg, gwi, gwo = local_fixed_experts_backward(grad_TD, x_TD, h_ECF, s_ECH, idx_EC, gate_EC,
                                                    w_in_EDF, w_out_EHD, ctx.need_gate)
    return gx, None, (gg if ctx.need_gate else None), gwi, gwo


local_fixed_experts.register_autograd(_fused_backward, setup_context=_fused_setup)


# Per-tensor budget of a group. A group's temporaries (about three such tensors) must also stay
# under glibc's heap trim threshold, which follows the mmap threshold (2x, so ~16 MB in
# practice): 16 MB groups lost half the gain (their memory went back to the OS after each
# group); 2, 4 and 8 MB measured alike.
_GROUP_BYTES = 4 << 20


def _expert_groups(E: int, C: int, width: int, like: torch.Tensor) -> list:
    """Slices of the E experts whose per-group temporaries ([g, C, width]) stay under
    _GROUP_BYTES (one group on a GPU)."""
    if like.device.type != "cpu" or not _GROUP_BYTES:
        return [slice(0, E)]
    per_expert = C * width * like.element_size()
    size = max(1, min(E, _GROUP_BYTES // max(per_expert, 1)))
    return [slice(i, min(i + size, E)) for i in range(0, E, size)]


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN; n shared experts of width h are exactly one SwiGLU of width n*h."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(swiglu(self.w_in(x)))


class Experts(nn.Module):
    """`num_local` SwiGLU experts as [E, D, 2H] and [E, H, D] tensors (one batched matmul each).

    `first_expert` is the global index of the first local expert; initialization draws each
    expert from a generator seeded by (seed, layer, global expert), so weights do not depend on
    how experts are split across ranks.
    """

    def __init__(self, num_local: int, d_model: int, hidden: int, first_expert: int = 0):
        super().__init__()
        self.num_local, self.first_expert, self.hidden = num_local, first_expert, hidden
        self.w_in_EDF = nn.Parameter(torch.empty(num_local, d_model, 2 * hidden))
        self.w_out_EHD = nn.Parameter(torch.empty(num_local, hidden, d_model))

    @torch.no_grad()
    def init_weights(self, seed: int, layer: int, std_in: float, std_out: float) -> None:
        for e in range(self.num_local):
            g = torch.Generator().manual_seed((seed * 1_000_003 + layer) * 100_003 + self.first_expert + e)
            self.w_in_EDF[e].copy_(torch.randn(self.w_in_EDF.shape[1:], generator=g) * std_in)
            self.w_out_EHD[e].copy_(torch.randn(self.w_out_EHD.shape[1:], generator=g) * std_out)

    def forward_fixed(self, x_ECD: torch.Tensor, gate_EC: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every expert has the same C rows: two bmm's, no padding, no loop. `gate_EC` scales each
        row's hidden activation (the same as scaling its output, at half the width)."""
        h_ECF = torch.bmm(x_ECD, self.w_in_EDF.to(x_ECD.dtype))   # .to is a no-op when dtypes match
        return torch.bmm(swiglu(h_ECF, gate_EC), self.w_out_EHD.to(x_ECD.dtype))

    def forward_local(self, x_TD: torch.Tensor, token_idx_EC: torch.Tensor,
                      gate_EC: torch.Tensor) -> torch.Tensor:
        """Gather, forward_fixed with the gates, and scatter-add back to [T, D], as one autograd
        node (see _local_fixed_forward): for when every expert is on this process. Compiled
        for a GPU, the same steps as plain ops, which inductor fuses (see compiling()); compiled
        for the CPU, the node stays one opaque call (see local_fixed_experts)."""
        if compiling() and x_TD.device.type != "cpu":
            D = x_TD.shape[-1]
            rows_ECD = x_TD.index_select(0, token_idx_EC.reshape(-1)).view(*token_idx_EC.shape, D)
            y_ECD = self.forward_fixed(rows_ECD, gate_EC)
            return x_TD.new_zeros(x_TD.shape).index_add(0, token_idx_EC.reshape(-1), y_ECD.reshape(-1, D))
        return local_fixed_experts(x_TD, token_idx_EC, gate_EC, self.w_in_EDF.to(x_TD.dtype),
                                   self.w_out_EHD.to(x_TD.dtype))[0]

    def forward_ragged(self, x_ND: torch.Tensor, counts_E: torch.Tensor,
                       gate_N: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows grouped by expert, counts_E rows each (token-choice dropless)."""
        w_in, w_out = self.w_in_EDF.to(x_ND.dtype), self.w_out_EHD.to(x_ND.dtype)
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        # grouped_mm needs every row stride to be a multiple of 16 bytes (D, 2H and H elements)
        aligned = all(n * x_ND.element_size() % 16 == 0 for n in (w_in.shape[1], w_in.shape[2], w_out.shape[1]))
        if aligned and grouped_mm_supported(x_ND) and not _LOOP_ONLY[0]:
            h_NF = _grouped(x_ND, w_in, offs)
            return _grouped(swiglu(h_NF, gate_N), w_out, offs)
        counts = counts_E.tolist()
        gates = torch.split(gate_N, counts) if gate_N is not None else [None] * len(counts)
        return torch.cat([swiglu(c @ w_in[e], g) @ w_out[e]
                          for e, (c, g) in enumerate(zip(torch.split(x_ND, counts), gates))])


def _grouped(x_ND: torch.Tensor, w_EDF: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    y = torch._grouped_mm(x_ND, w_EDF, offs=offs)
    if y.requires_grad:   # its backward rejects stride-0 (expanded) gradients
        y.register_hook(lambda g: g.contiguous())
    return y


_GROUPED_OK: dict = {}
_LOOP_ONLY = [False]


@contextlib.contextmanager
def grouped_mm_disabled():
    """Ragged experts take the per-expert loop even where torch._grouped_mm runs: the reference
    the grouped path is checked against (benchmarks/gpu_check.py)."""
    _LOOP_ONLY[0] = True
    try:
        yield
    finally:
        _LOOP_ONLY[0] = False


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs for this device and dtype (probed once, then cached).

    It needs Hopper-class GPUs for bf16 on CUDA and has a CPU implementation in recent torch;
    anything else takes the per-expert loop, which computes the same function.
    """
    if compiling():   # the probe cannot run while tracing; the compiler accepts bf16 on CUDA only
        return x.device.type == "cuda" and x.dtype == torch.bfloat16
    key = (x.device.type, x.device.index, x.dtype)
    if key not in _GROUPED_OK:
        try:
            a = torch.randn(4, 8, device=x.device, dtype=x.dtype)
            b = torch.randn(2, 8, 16, device=x.device, dtype=x.dtype)
            torch._grouped_mm(a, b, offs=torch.tensor([1, 4], device=x.device, dtype=torch.int32))
            _GROUPED_OK[key] = hasattr(torch, "_grouped_mm")
        except (RuntimeError, AttributeError, NotImplementedError):
            _GROUPED_OK[key] = False
    return _GROUPED_OK[key]
