"""FLOPs of a training step, counted from what was actually computed.

Routed-expert FLOPs come from the (token, expert) assignments the routers made (the realized
mean k, after drops, padding slots of capacity-factor TC included because they are computed),
never from a nominal k. The output head runs only at masked positions. Training = 3 x forward
(backward is two matmuls per forward matmul).
"""
from __future__ import annotations

from typing import Optional

import torch

from model.config import ModelConfig, dense_hidden, head_dim, is_moe_layer, shared_hidden

# dense bf16 tensor-core peaks (TFLOP/s) for MFU; unknown devices (and CPUs) report null
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
               "L40S": 362.0, "B200": 2250.0, "GH200": 989.0}


def forward_flops(cfg: ModelConfig, tokens: int, seq_len: int, masked_tokens: float,
                  routed_assignments: float) -> float:
    """Forward FLOPs for `tokens` tokens in sequences of `seq_len`.

    routed_assignments: sum over MoE layers of the (token, expert) pairs computed.
    """
    m, e = cfg.model, cfg.moe
    d, hd = m.d_model, head_dim(m)
    kv = m.n_kv_heads or m.n_heads
    attn_proj = d * (m.n_heads * hd) * 2 + d * 2 * kv * hd
    attn_scores = 2 * seq_len * m.n_heads * hd            # QK^T and AV, bidirectional
    per_token = 0
    for i in range(m.n_layers):
        per_token += attn_proj + attn_scores
        if is_moe_layer(i, e):
            per_token += e.num_experts * d + e.num_shared_experts * 3 * d * shared_hidden(e)
        else:
            per_token += 3 * d * dense_hidden(e)
    return 2.0 * (per_token * tokens + 3 * d * e.expert_hidden * routed_assignments
                  + d * m.vocab_size * masked_tokens)


def train_flops(*args, **kwargs) -> float:
    return 3.0 * forward_flops(*args, **kwargs)


def device_peak_tflops(configured: Optional[float]) -> Optional[float]:
    if configured:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None
