"""Monte-Carlo ELBO of an answer given a prompt: the masked-diffusion bound on log p(answer | prompt).

For an answer of L tokens, one sample draws a count k in 1..L, masks k answer positions chosen
uniformly at random (the prompt is never masked) and scores

    X = (L / k) * sum over the k masked positions of -log p(token | visible tokens)

E[X] over k ~ U{1..L} and the random subset is the negative ELBO, an upper bound on
-log p(answer | prompt) (LLaDA's conditional likelihood). The counts of the `mc_num` samples are
stratified, k_i = 1 + floor(L (u0 + i) / mc_num) with one uniform u0, which keeps the estimate
unbiased and removes the variance that comes from how many of each k were drawn. The standard
error is the stratified one (by k) when every k has at least two samples, else the plain
sample standard error (then conservative).

Legend: S samples (one row each), L answer length, P prompt length, V vocab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .inference import model_device, model_mask_ratio


@dataclass
class ElboEstimate:
    loglik: float      # estimate of the ELBO (a lower bound on log p(answer | prompt)), nats
    stderr: float      # standard error of `loglik`
    num_tokens: int    # answer length L
    forward_passes: int


def stratified_counts(L: int, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """n mask counts in 1..L: each sample owns 1/n of [0, 1) and k = 1 + floor(L v)."""
    u0 = torch.rand((), generator=generator, dtype=torch.float64)
    v = (u0 + torch.arange(n, dtype=torch.float64)) / n
    return (torch.floor(v * L).long() + 1).clamp(1, L)


def random_subsets(k_S: torch.Tensor, L: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bool [S, L] with k_s True positions per row, uniformly among the C(L, k_s) subsets."""
    order_SL = torch.rand(len(k_S), L, generator=generator).argsort(1)
    rank_SL = torch.empty_like(order_SL)
    rank_SL.scatter_(1, order_SL, torch.arange(L).expand_as(order_SL))
    return rank_SL < k_S[:, None]


def pad_to_shape(x_SL: torch.Tensor, mask_SL: torch.Tensor, r_S: torch.Tensor, shape: tuple, pad_id: int):
    """Right-pad to `shape` = (rows, length), the extra rows copies of the last one: every rank of
    an expert-parallel group then runs the same shape. Returns the padded tensors and valid_BL."""
    rows, length = shape
    S, L = x_SL.shape
    take = torch.cat([torch.arange(S), torch.full((rows - S,), S - 1)]).to(x_SL.device)
    x = torch.nn.functional.pad(x_SL[take], (0, length - L), value=pad_id)
    mask = torch.nn.functional.pad(mask_SL[take], (0, length - L), value=False)
    valid = torch.nn.functional.pad(torch.ones_like(mask_SL[take]), (0, length - L), value=False)
    return x, mask, r_S[take], valid


def prompt_cols(S: int, P: int, L: int, device) -> torch.Tensor:
    """Bool [S, P + L], True on the prompt's columns."""
    return (torch.arange(P + L, device=device) < P).expand(S, P + L)


@torch.no_grad()
def masked_answer_nll(model, prompt: Sequence[int], answer: Sequence[int], amask_SL: torch.Tensor,
                      pad_to: Optional[tuple] = None) -> torch.Tensor:
    """[S] sum of -log p over the masked answer positions of each row, in one forward (of shape
    `pad_to` = (rows, length) if given)."""
    m = model.cfg.model
    dev = model_device(model)
    S, L, P = amask_SL.shape[0], len(answer), len(prompt)
    ans_L = torch.as_tensor(list(answer), dtype=torch.long, device=dev)
    amask_SL = amask_SL.to(dev)
    x_SL = torch.cat([torch.as_tensor(list(prompt), dtype=torch.long, device=dev).expand(S, P),
                      torch.where(amask_SL, torch.full_like(amask_SL, m.mask_id, dtype=torch.long), ans_L)], 1)
    mask_SL = torch.cat([torch.zeros(S, P, dtype=torch.bool, device=dev), amask_SL], 1)
    r_S = model_mask_ratio(model, x_SL, torch.ones_like(mask_SL), prompt_cols(S, P, L, dev))
    valid = None
    if pad_to is not None:
        x_SL, mask_SL, r_S, valid = pad_to_shape(x_SL, mask_SL, r_S, pad_to, m.pad_id)
    logits_NV = model(x_SL, r_S, valid, logits_mask_BL=mask_SL).logits
    n_real = int(amask_SL.sum())   # the padded rows' logits come last; drop them
    nll_N = F.cross_entropy(logits_NV[:n_real].double(), ans_L.expand(S, L)[amask_SL], reduction="none")
    row_N = torch.arange(S, device=dev)[:, None].expand(S, L)[amask_SL]
    return torch.zeros(S, dtype=torch.float64, device=dev).index_add_(0, row_N, nll_N).cpu()


def stratified_stderr(x_S: torch.Tensor, k_S: torch.Tensor) -> float:
    """Standard error of mean(x) for samples stratified by k (weights n_k / n)."""
    n = len(x_S)
    ks = k_S.unique()
    counts = torch.stack([(k_S == k).sum() for k in ks])
    if n < 2:
        return float("nan")
    if bool((counts < 2).any()):
        return float(x_S.std(unbiased=True) / math.sqrt(n))
    var = sum(float((k_S == k).sum()) * float(x_S[k_S == k].var(unbiased=True)) for k in ks) / n ** 2
    return math.sqrt(var)


def elbo_loglik(model, prompt: Sequence[int], answer: Sequence[int], mc_num: int = 64, batch_size: int = 32,
                generator: Optional[torch.Generator] = None, pad_to: Optional[tuple] = None) -> ElboEstimate:
    """Monte-Carlo ELBO of `answer` after `prompt` (token id lists) with `mc_num` samples, in
    forwards of `batch_size` rows (each padded to `pad_to` = (rows, length) if given)."""
    L = len(answer)
    if L == 0:
        return ElboEstimate(0.0, 0.0, 0, 0)
    if len(prompt) + L > model.cfg.model.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)}) + answer ({L}) tokens exceed "
                         f"model.max_seq_len={model.cfg.model.max_seq_len}")
    k_S = stratified_counts(L, mc_num, generator)
    amask_SL = random_subsets(k_S, L, generator)
    nll_S = torch.cat([masked_answer_nll(model, prompt, answer, amask_SL[i:i + batch_size], pad_to)
                       for i in range(0, mc_num, batch_size)])
    x_S = nll_S * L / k_S.double()
    return ElboEstimate(-float(x_S.mean()), stratified_stderr(x_S, k_S), L, -(-mc_num // batch_size))
