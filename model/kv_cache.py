"""Block key/value cache for diffusion decoding (Fast-dLLM's prefix and dual caches).

    cache = BlockKVCache()
    model(x_BL, r_B, valid_BL, cache=cache)     # recording: a full forward stores every layer's K/V
    cache.span = (start, end)
    model(x_BL, r_B, valid_BL, cache=cache)     # computes columns start:end only; the other
                                                # columns' keys and values come from the recording

A span forward takes the whole canvas (tokens, valid, logits mask) and cuts the span out itself,
so its callers look like uncached ones. Its queries, keys and values of the span are fresh; every
other column attends nowhere and is seen as recorded. Positions (RoPE) are the canvas columns.

Legend: B batch, L canvas length, A span length, K kv heads, Dh head dim.
"""
from __future__ import annotations

from typing import Optional

import torch


class BlockKVCache:
    """Keys and values (after QK-norm and RoPE) of every attention layer over the whole canvas."""

    def __init__(self):
        self.k: dict = {}                   # layer index -> [B, K, L, Dh]
        self.v: dict = {}
        self.span: Optional[tuple] = None   # None: the next forward records

    @property
    def recording(self) -> bool:
        return self.span is None

    def layer(self, i: int) -> "LayerKV":
        return LayerKV(self, i)


class LayerKV:
    """What one attention layer calls with its fresh keys and values: records them, or splices
    the span's fresh ones into the recorded canvas."""

    def __init__(self, cache: BlockKVCache, i: int):
        self.cache, self.i = cache, i

    def __call__(self, k_BKAd: torch.Tensor, v_BKAd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        if c.recording:
            c.k[self.i], c.v[self.i] = k_BKAd, v_BKAd
            return k_BKAd, v_BKAd
        if self.i not in c.k:
            raise RuntimeError("a span forward needs a recorded cache: run one full forward with it first")
        a, b = c.span
        k_BKLd, v_BKLd = c.k[self.i], c.v[self.i]
        if k_BKLd.shape[0] != k_BKAd.shape[0] or b - a != k_BKAd.shape[2]:
            raise RuntimeError(f"cache recorded for {k_BKLd.shape[0]} rows cannot serve a span of "
                               f"{k_BKAd.shape[0]} rows x {k_BKAd.shape[2]} columns at {a}:{b}")
        return (torch.cat([k_BKLd[:, :, :a], k_BKAd, k_BKLd[:, :, b:]], 2),
                torch.cat([v_BKLd[:, :, :a], v_BKAd, v_BKLd[:, :, b:]], 2))
