"""Diffusion noise for a whole global batch, from (seed, step) alone.

Every rank draws the same [G] per-sequence u and [G, L] per-token uniforms and keeps the rows of
its own sequences (by their offset in the global batch). Masks therefore depend only on the data
and the step, never on how many ranks there are, which is what makes losses independent of the
parallel layout and resume exact without saving generator state.
"""
from __future__ import annotations

import torch

from model.diffusion import stratified_u, uniform_u


def global_batch_noise(seed: int, step: int, global_batch: int, seq_len: int,
                       stratified: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    u_G = stratified_u(global_batch, g) if stratified else uniform_u(global_batch, g)
    token_u_GL = torch.rand(global_batch, seq_len, generator=g, dtype=torch.float32)
    return u_G, token_u_GL
