"""Bidirectional transformer for absorbing-mask diffusion: RMSNorm (fp32), RoPE (rotate-half),
optional QK-norm (per head, or over the whole projection), SDPA with no causal mask and a
key-padding mask (`model.attention=causal` adds one, to reproduce an imported autoregressive
model), GQA, no biases, untied head, optional logit soft-cap. FFNs are MoE layers (every `moe_every`-th layer) or dense SwiGLU.

Legend: B batch, L length, D model dim, H heads, K kv heads, Dh head dim, V vocab, N selected rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, dense_hidden, head_dim, is_moe_layer, qk_norm_dims, qk_norm_kind
from .moe.experts import SwiGLU
from .moe.layer import MoELayer, MoEStats


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()   # statistics in fp32 even under bf16
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [L, Dh/2] for rotate-half (NeoX) RoPE."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x_BHLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHLD.float().chunk(2, dim=-1)
    L = x_BHLD.shape[-2]
    cos, sin = cos[:L], sin[:L]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BHLD.dtype)


def causal_mask(attn_mask_B11L: Optional[torch.Tensor], L: int, device) -> torch.Tensor:
    """Key padding and causality in one boolean mask [B|1, 1, L, L]. A query always sees itself,
    so a left-pad query (which sees only pads) gets no all-masked row (NaN in SDPA)."""
    tril_LL = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    eye_LL = torch.eye(L, dtype=torch.bool, device=device)
    return tril_LL if attn_mask_B11L is None else (attn_mask_B11L & tril_LL) | eye_LL


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.model
        self.n_heads, self.n_kv = m.n_heads, m.n_kv_heads or m.n_heads
        self.head_dim = head_dim(m)
        self.wq = nn.Linear(m.d_model, self.n_heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(m.d_model, 2 * self.n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, m.d_model, bias=False)
        # ---- model.qk_norm (head | full) and model.attention (bidirectional | causal) ----
        self.qk_norm, self.causal = qk_norm_kind(m), m.attention == "causal"
        q_dim, k_dim = qk_norm_dims(m) or (None, None)
        self.q_norm = RMSNorm(q_dim, m.norm_eps) if q_dim else None
        self.k_norm = RMSNorm(k_dim, m.norm_eps) if k_dim else None

    def forward(self, x_BLD, rope, attn_mask_B11L: Optional[torch.Tensor], kv=None) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        q_BLX, kv_BLY = self.wq(x_BLD), self.wkv(x_BLD)
        if self.qk_norm == "full":   # OLMoE: over the whole q and k projections, before the head split
            k_BLX, v_BLX = kv_BLY.chunk(2, dim=-1)
            q_BLX, kv_BLY = self.q_norm(q_BLX), torch.cat([self.k_norm(k_BLX), v_BLX], dim=-1)
        q_BHLd = q_BLX.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k_BKLd, v_BKLd = kv_BLY.view(B, L, 2, self.n_kv, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.qk_norm == "head":   # QK-norm per head, before RoPE
            q_BHLd, k_BKLd = self.q_norm(q_BHLd), self.k_norm(k_BKLd)
        q_BHLd, k_BKLd = apply_rope(q_BHLd, *rope), apply_rope(k_BKLd, *rope)
        if kv is not None:   # block cache (model/kv_cache.py): records these, or adds the cached columns
            k_BKLd, v_BKLd = kv(k_BKLd, v_BKLd)
        if self.causal:   # an imported autoregressive model, before its conversion (model.attention)
            if kv is not None:
                raise ValueError("a block cache serves bidirectional attention only (model.attention=causal)")
            attn_mask_B11L = causal_mask(attn_mask_B11L, L, x_BLD.device)
        o_BHLd = F.scaled_dot_product_attention(q_BHLd, k_BKLd, v_BKLd, attn_mask=attn_mask_B11L,
                                                is_causal=False, enable_gqa=self.n_kv != self.n_heads)
        return self.wo(o_BHLd.transpose(1, 2).reshape(B, L, -1))


@dataclass
class BlockOutput:
    hidden: torch.Tensor
    loss: torch.Tensor
    stats: Optional[MoEStats] = None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, ep_group=None):
        super().__init__()
        d = cfg.model.d_model
        self.attn_norm, self.ffn_norm = RMSNorm(d, cfg.model.norm_eps), RMSNorm(d, cfg.model.norm_eps)
        self.attn = Attention(cfg)
        self.is_moe = is_moe_layer(layer_idx, cfg.moe)
        self.ffn = (MoELayer(d, cfg.moe, ep_group, layer_idx, init_seed=None, capacity=cfg.capacity) if self.is_moe
                    else SwiGLU(d, dense_hidden(cfg.moe)))

    def forward(self, x_BLD, rope, attn_mask, mask_ratio_B, valid_BL, ec_sizes=None, kv=None) -> BlockOutput:
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), rope, attn_mask, kv)
        h_BLD = self.ffn_norm(x_BLD)
        if not self.is_moe:
            return BlockOutput(x_BLD + self.ffn(h_BLD), x_BLD.new_zeros(()))
        out = self.ffn(h_BLD, mask_ratio_B, valid_BL, ec_sizes)
        return BlockOutput(x_BLD + out.hidden, out.loss, out.stats)


@dataclass
class ModelOutput:
    logits: torch.Tensor                  # [B, L, V], or [N, V] for the positions in logits_mask
    aux_loss: torch.Tensor                # sum of MoE z-/balance losses (weighted)
    moe: list = field(default_factory=list)   # MoEStats per MoE layer


class DiffusionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, ep_group=None, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i, ep_group) for i in range(m.n_layers))
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        self.head = nn.Linear(m.d_model, m.vocab_size, bias=False)   # untied
        cos, sin = rope_tables(m.max_seq_len, head_dim(m), m.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """N(0, std) everywhere, output projections scaled by 1/sqrt(2 n_layers) (GPT-2 style).

        Seeded from `seed` alone (not the global RNG), and experts per global expert index, so
        every parallel layout starts from the same weights.
        """
        m = self.cfg.model
        std, std_out = m.init_std, m.init_std / math.sqrt(2 * m.n_layers)
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or ".experts." in name:
                continue
            is_out = name.endswith(("wo.weight", "w_out.weight"))
            p.copy_(torch.randn(p.shape, generator=g) * (std_out if is_out else std))
        for i, block in enumerate(self.blocks):
            if block.is_moe:
                block.ffn.experts.init_weights(seed, i, std, std_out)

    def forward(self, tokens_BL: torch.Tensor, mask_ratio_B: Optional[torch.Tensor] = None,
                valid_BL: Optional[torch.Tensor] = None,
                logits_mask_BL: Optional[torch.Tensor] = None, cache=None) -> ModelOutput:
        """valid_BL: False at pad positions (None = no padding, which keeps flash attention).
        logits_mask_BL: compute the output head only where True (the masked positions).
        cache: a model.kv_cache.BlockKVCache, recording (a full forward) or with a span of columns
        to compute (the other columns' keys and values come from it; logits are the span's)."""
        B, L = tokens_BL.shape
        if L > self.cfg.model.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds model.max_seq_len={self.cfg.model.max_seq_len}")
        rope = (self.rope_cos, self.rope_sin)
        attn_mask = valid_BL[:, None, None, :] if valid_BL is not None else None   # key padding
        kvs = [None] * len(self.blocks) if cache is None else [cache.layer(i) for i in range(len(self.blocks))]
        if cache is not None and cache.span is not None:   # span forward: queries, MoE, head of a:b only
            a, b = cache.span
            tokens_BL, rope = tokens_BL[:, a:b], (self.rope_cos[a:b], self.rope_sin[a:b])
            valid_BL = valid_BL[:, a:b] if valid_BL is not None else None
            logits_mask_BL = logits_mask_BL[:, a:b] if logits_mask_BL is not None else None
        x_BLD = self.embed(tokens_BL)
        aux, stats = x_BLD.new_zeros((), dtype=torch.float32), []
        moe = self.moe_layers()   # a dynamic EC schedule's sizes, read once for every layer
        # (over the computed columns: under a cache span they compete among themselves)
        sizes = moe[0].ec_sizes(mask_ratio_B, valid_BL, B, tokens_BL.shape[1]) if moe else None
        for block, kv in zip(self.blocks, kvs):
            if self.cfg.model.activation_checkpointing and self.training:
                out = checkpoint(block, x_BLD, rope, attn_mask, mask_ratio_B, valid_BL, sizes, use_reentrant=False)
            else:
                out = block(x_BLD, rope, attn_mask, mask_ratio_B, valid_BL, sizes, kv)
            x_BLD, aux = out.hidden, aux + out.loss
            if out.stats is not None:
                stats.append(out.stats)
        h = self.norm(x_BLD)
        if logits_mask_BL is not None:
            # flat row indices (one sync: N depends on the data), then index_select, whose
            # backward is an index_add; h[mask]'s backward would find the rows a second time
            rows_N = logits_mask_BL.reshape(-1).nonzero().squeeze(1)
            h = h.reshape(-1, h.shape[-1]).index_select(0, rows_N)        # [N, D]
        logits = self.head(h).float()
        if self.cfg.model.logit_softcap:
            cap = self.cfg.model.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return ModelOutput(logits, aux, stats)

    def moe_layers(self) -> list:
        return [b.ffn for b in self.blocks if b.is_moe]
