"""Absorbing-mask diffusion objective as a chain of small functions:

    u = uniform_u(...) or stratified_u(...)     per-sequence noise level in [0, 1)
    t = time_from_u(u, eps)                     t = (1 - eps) u + eps
    m = mask_tokens(tokens, t, token_u, ...)    realized mask and ratio r_b
    rec = diffusion_loss(logits, tokens, m, ...)  ELBO-weighted NLL record

Noise enters as tensors (u per sequence, token_u per position) rather than RNG calls inside
these functions, so the trainer can draw it for the whole global batch from one seeded
generator and every parallel layout sees the same masks.

Legend: B batch, L length, V vocab, N masked positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


def uniform_u(n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def stratified_u(n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Low-discrepancy u_i = (u0 + i/n) mod 1 over the n sequences of the *global* batch."""
    u0 = torch.rand(1, generator=generator, dtype=torch.float64)
    return (u0 + torch.arange(n, dtype=torch.float64) / n) % 1.0


def time_from_u(u: torch.Tensor, eps: float) -> torch.Tensor:
    return (1 - eps) * u + eps


def mask_ratio(mask_BL: torch.Tensor, valid_BL: Optional[torch.Tensor] = None,
               prompt_BL: Optional[torch.Tensor] = None, over: str = "sequence") -> torch.Tensor:
    """r_b: the fraction of a sequence's positions that are masked, the one rule that training,
    the sampler and the HF model share (so an expert-choice layer gets the same capacity for the
    same partly masked input wherever it runs).

    over="sequence": masked / non-pad positions (pretraining: nothing is a prompt).
    over="response": masked / non-pad positions outside the prompt (supervised fine-tuning: the
    prompt is never masked, so r_b is the response's state, the quantity its ELBO weighting and the
    capacity schedule learned). With no prompt both give the same value. A sequence with nothing
    to count gets r = 0.
    """
    count_BL = torch.ones_like(mask_BL, dtype=torch.bool) if valid_BL is None else valid_BL.bool()
    if over == "response" and prompt_BL is not None:
        count_BL = count_BL & ~prompt_BL.bool()
    elif over not in ("sequence", "response"):
        raise ValueError(f"over={over!r} must be 'sequence' or 'response'")
    masked = (mask_BL.bool() & count_BL).sum(1).to(torch.float32)
    return masked / count_BL.sum(1).clamp_min(1).to(torch.float32)


@dataclass
class Masked:
    noisy_BL: torch.Tensor     # tokens with masked positions replaced by the mask id
    mask_BL: torch.Tensor      # True where masked
    ratio_B: torch.Tensor      # realized r_b = masked / maskable (what capacity and weighting use)
    maskable_BL: torch.Tensor  # non-pad and non-prompt positions


def mask_tokens(tokens_BL: torch.Tensor, t_B: torch.Tensor, token_u_BL: torch.Tensor, mask_id: int,
                valid_BL: Optional[torch.Tensor] = None, prompt_BL: Optional[torch.Tensor] = None) -> Masked:
    """Mask each maskable position with probability t_b (token_u < t_b); at least one per sequence.

    A sequence whose draw masked nothing gets its maskable position with the smallest token_u
    masked, which keeps the result a deterministic function of the noise.
    """
    maskable = torch.ones_like(tokens_BL, dtype=torch.bool) if valid_BL is None else valid_BL.bool()
    if prompt_BL is not None:   # prompt positions are never masked (supervised fine-tuning)
        maskable = maskable & ~prompt_BL.bool()
    token_u = token_u_BL.to(torch.float64)
    mask = (token_u < t_B.to(torch.float64)[:, None]) & maskable
    empty_B = (mask.sum(1) == 0) & maskable.any(1)
    # unconditionally, with no `if empty_B.any()`: that branch would read a value back to the host
    first_B = token_u.masked_fill(~maskable, float("inf")).argmin(1)
    col_L = torch.arange(mask.shape[1], device=mask.device)
    mask = mask | (empty_B[:, None] & (col_L[None, :] == first_B[:, None]))
    # masked / maskable: what the ELBO weight needs; it is mask_ratio's "response" rule
    ratio = mask_ratio(mask, valid_BL, prompt_BL, "response")
    noisy = torch.where(mask, torch.full_like(tokens_BL, mask_id), tokens_BL)
    return Masked(noisy, mask, ratio, maskable)


@dataclass
class DiffusionLoss:
    loss: torch.Tensor         # scalar to backpropagate (per `loss_weighting`)
    elbo: torch.Tensor         # scalar ELBO-weighted NLL per token (always reported), detached
    ratio_B: torch.Tensor      # realized mask ratio per sequence
    nll_BL: torch.Tensor       # per-token cross-entropy at masked positions, 0 elsewhere, detached
    mask_BL: torch.Tensor
    num_tokens: torch.Tensor   # maskable tokens in the batch (the normalizer)


def diffusion_loss(logits_NV: torch.Tensor, tokens_BL: torch.Tensor, masked: Masked,
                   weighting: str = "elbo") -> DiffusionLoss:
    """LLaDA's ELBO: sum over masked tokens of CE / r_b, divided by the number of maskable tokens.

    logits_NV are the head outputs at the masked positions only (row-major order of mask_BL), so
    the vocabulary projection is never computed for positions that carry no loss.
    `weighting="uniform"` weighs every masked token the same (sum CE / number masked): no 1/r
    factor, so low-ratio sequences cannot blow up the gradient.
    `weighting="stable"` is EC-DLM's --difflm-stable-training: sum CE over masked tokens divided by
    all maskable tokens (uniform times the batch's masked fraction; no 1/r factor either).
    `logits_NV` may instead be [B, L, V], every position's (diffusion.sync_free): the same sums,
    taken over every position with the unmasked ones weighted 0, and no masked rows to find.
    """
    mask = masked.mask_BL
    if logits_NV.dim() == 3:
        return _dense_diffusion_loss(logits_NV, tokens_BL, masked, weighting)
    # the masked positions as flat indices, found once: each boolean index would sync on its own
    pos_N = mask.reshape(-1).nonzero().squeeze(1)
    nll_N = F.cross_entropy(logits_NV.float(), tokens_BL.reshape(-1)[pos_N], reduction="none")
    inv_r_N = (1.0 / masked.ratio_B.clamp_min(1e-6))[pos_N // mask.shape[1]]
    n_tokens = masked.maskable_BL.sum()
    elbo = (nll_N * inv_r_N).sum() / n_tokens.clamp_min(1)
    loss = weighted_loss(weighting, elbo, nll_N.sum(), mask.sum(), n_tokens)
    nll_BL = torch.zeros(mask.numel(), dtype=nll_N.dtype, device=nll_N.device)
    nll_BL = nll_BL.index_put_((pos_N,), nll_N.detach()).view(mask.shape)
    return DiffusionLoss(loss, elbo.detach(), masked.ratio_B, nll_BL, mask, n_tokens)


def weighted_loss(weighting: str, elbo: torch.Tensor, nll_sum: torch.Tensor, n_masked: torch.Tensor,
                  n_tokens: torch.Tensor) -> torch.Tensor:
    """The loss `diffusion.loss_weighting` asks for, from the sums both loss forms share."""
    if weighting == "elbo":
        return elbo
    if weighting == "uniform":
        return nll_sum / n_masked.clamp_min(1)
    if weighting == "stable":
        return nll_sum / n_tokens.clamp_min(1)
    raise ValueError(f"loss_weighting={weighting!r} must be 'elbo', 'uniform' or 'stable'")


def _dense_diffusion_loss(logits_BLV: torch.Tensor, tokens_BL: torch.Tensor, masked: Masked,
                          weighting: str) -> DiffusionLoss:
    """diffusion_loss from every position's logits: CE everywhere, kept where masked. Exactly the
    masked-rows objective (the same sums), with shapes fixed by B and L: no host sync."""
    mask = masked.mask_BL
    ce_BL = F.cross_entropy(logits_BLV.float().flatten(0, 1), tokens_BL.reshape(-1), reduction="none").view(mask.shape)
    nll_BL = torch.where(mask, ce_BL, torch.zeros_like(ce_BL))
    n_tokens = masked.maskable_BL.sum()
    elbo = (nll_BL / masked.ratio_B.clamp_min(1e-6)[:, None]).sum() / n_tokens.clamp_min(1)
    loss = weighted_loss(weighting, elbo, nll_BL.sum(), mask.sum(), n_tokens)
    return DiffusionLoss(loss, elbo.detach(), masked.ratio_B, nll_BL.detach(), mask, n_tokens)


def loss_by_ratio_bin(rec: DiffusionLoss, num_bins: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """ELBO numerator (sum of CE / r_b) and token count per mask-ratio bin, summable across
    micro-batches and ranks; bin loss = numerator / count. Bin i holds r in [i/n, (i+1)/n)."""
    seq_num_B = rec.nll_BL.sum(1) / rec.ratio_B.clamp_min(1e-6)
    seq_tok_B = torch.round(rec.mask_BL.sum(1) / rec.ratio_B.clamp_min(1e-6))   # maskable per sequence
    bin_B = (rec.ratio_B * num_bins).long().clamp(0, num_bins - 1)
    num = torch.zeros(num_bins, dtype=torch.float64, device=seq_num_B.device)
    cnt = torch.zeros(num_bins, dtype=torch.float64, device=seq_num_B.device)
    num.index_add_(0, bin_B, seq_num_B.double())
    cnt.index_add_(0, bin_B, seq_tok_B.double())
    return num, cnt


@dataclass
class TrainingForward:
    """One training forward: what to backpropagate, and the records it came from."""
    loss: torch.Tensor         # diffusion loss + the MoE layers' weighted z-/balance losses
    diffusion: DiffusionLoss
    output: object             # the model's ModelOutput (logits at masked positions, MoE stats)


def forward_loss(model, tokens_BL: torch.Tensor, u_B: torch.Tensor, token_u_BL: torch.Tensor,
                 valid_BL: Optional[torch.Tensor] = None, prompt_BL: Optional[torch.Tensor] = None) -> TrainingForward:
    """One diffusion training forward: mask, run the model on the noisy tokens, weigh the NLL."""
    cfg = model.cfg
    if prompt_BL is not None and cfg.diffusion.mask_ratio_over != "response":
        raise ValueError("a prompt mask needs diffusion.mask_ratio_over=response (train.mode=sft sets it): "
                         "the ELBO weight and the capacity schedule count the response only")
    t_B = time_from_u(u_B, cfg.diffusion.eps).to(tokens_BL.device)
    masked = mask_tokens(tokens_BL, t_B, token_u_BL.to(tokens_BL.device), cfg.model.mask_id, valid_BL, prompt_BL)
    # sync_free: the head over every position (no masked rows to find), at the cost of its
    # FLOPs on the unmasked ones
    head_rows = None if cfg.diffusion.sync_free else masked.mask_BL
    out = model(masked.noisy_BL, masked.ratio_B, valid_BL, logits_mask_BL=head_rows)
    rec = diffusion_loss(out.logits, tokens_BL, masked, cfg.diffusion.loss_weighting)
    return TrainingForward(rec.loss + out.aux_loss, rec, out)
