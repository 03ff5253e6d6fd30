"""Routed SwiGLU experts stored as stacked weights, plus the dense SwiGLU used for shared experts
and non-MoE layers.

Legend: E local experts, C slots per expert, N ragged rows, D model dim, H expert hidden,
F = 2H (gate and up projections fused into one matmul).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def swiglu(h_xF: torch.Tensor) -> torch.Tensor:
    gate, up = h_xF.chunk(2, dim=-1)
    return F.silu(gate) * up


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

    def forward_fixed(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Every expert has the same C rows: two bmm's, no padding, no loop."""
        h_ECF = torch.bmm(x_ECD, self.w_in_EDF.to(x_ECD.dtype))
        return torch.bmm(swiglu(h_ECF), self.w_out_EHD.to(x_ECD.dtype))

    def forward_ragged(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows grouped by expert, counts_E rows each (token-choice dropless)."""
        w_in, w_out = self.w_in_EDF.to(x_ND.dtype), self.w_out_EHD.to(x_ND.dtype)
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        if grouped_mm_supported(x_ND):
            h_NF = _grouped(x_ND, w_in, offs)
            return _grouped(swiglu(h_NF), w_out, offs)
        chunks = torch.split(x_ND, counts_E.tolist())
        return torch.cat([swiglu(c @ w_in[e]) @ w_out[e] for e, c in enumerate(chunks)])


def _grouped(x_ND: torch.Tensor, w_EDF: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    y = torch._grouped_mm(x_ND, w_EDF, offs=offs)
    if y.requires_grad:   # its backward rejects stride-0 (expanded) gradients
        y.register_hook(lambda g: g.contiguous())
    return y


_GROUPED_OK: dict = {}


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs for this device and dtype (probed once, then cached).

    It needs Hopper-class GPUs for bf16 on CUDA and has a CPU implementation in recent torch;
    anything else takes the per-expert loop, which computes the same function.
    """
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
