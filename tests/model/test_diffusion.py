import math

import pytest
import torch

from model.diffusion import (diffusion_loss, loss_by_ratio_bin, mask_tokens, stratified_u, time_from_u)

MASK = 3


def test_time_bounds_and_stratified_u_covers_all_strata():
    u = stratified_u(8, torch.Generator().manual_seed(0))
    strata = torch.sort(torch.floor(u * 8)).values
    assert strata.tolist() == list(range(8))
    t = time_from_u(torch.tensor([0.0, 1.0], dtype=torch.float64), 1e-3)
    assert t.tolist() == pytest.approx([1e-3, 1.0])


def test_realized_ratio_and_pads_never_masked():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(5, 50, (4, 100), generator=g)
    valid = torch.ones(4, 100, dtype=torch.bool)
    valid[2, 60:] = False
    t = torch.tensor([0.1, 0.5, 0.9, 0.3])
    m = mask_tokens(tokens, t, torch.rand(4, 100, generator=g, dtype=torch.float64), MASK, valid)
    assert not m.mask_BL[~valid].any()
    expect = m.mask_BL.sum(1).float() / valid.sum(1).float()
    torch.testing.assert_close(m.ratio_B, expect)
    assert (m.noisy_BL[m.mask_BL] == MASK).all() and torch.equal(m.noisy_BL[~m.mask_BL], tokens[~m.mask_BL])
    assert (m.ratio_B - t).abs().max() < 0.2   # realized ratio tracks t


def test_at_least_one_mask_per_sequence_and_prompt_protected():
    tokens = torch.arange(10, 30).view(2, 10)
    token_u = torch.full((2, 10), 0.99, dtype=torch.float64)
    token_u[0, 7] = 0.5   # smallest noise among maskable positions of row 0
    prompt = torch.zeros(2, 10, dtype=torch.bool)
    prompt[:, :4] = True
    token_u[1, 1] = 0.1   # smallest overall in row 1, but it is in the prompt
    token_u[1, 5] = 0.2
    m = mask_tokens(tokens, torch.tensor([0.01, 0.01]), token_u, MASK, prompt_BL=prompt)
    assert m.mask_BL.sum(1).tolist() == [1, 1]
    assert m.mask_BL[0, 7] and m.mask_BL[1, 5]
    assert not m.mask_BL[prompt].any()
    assert m.ratio_B.tolist() == pytest.approx([1 / 6, 1 / 6])


def test_elbo_weighting_hand_computed():
    # two sequences of length 4 (second has one pad), vocab 4
    tokens = torch.tensor([[0, 1, 2, 3], [1, 1, 2, 0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    token_u = torch.tensor([[0.1, 0.9, 0.2, 0.9], [0.9, 0.1, 0.9, 0.0]], dtype=torch.float64)
    m = mask_tokens(tokens, torch.tensor([0.5, 0.5]), token_u, MASK, valid)
    assert m.mask_BL.tolist() == [[True, False, True, False], [False, True, False, False]]
    # r = [2/4, 1/3]; logits at masked positions in row-major order: (0,0), (0,2), (1,1)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125],    # target 0 -> -log .5
                                     [0.25, 0.25, 0.25, 0.25],     # target 2 -> -log .25
                                     [0.1, 0.6, 0.2, 0.1]]))       # target 1 -> -log .6
    ce = [-math.log(0.5), -math.log(0.25), -math.log(0.6)]
    rec = diffusion_loss(logits, tokens, m, "elbo")
    expect = ((ce[0] + ce[1]) / 0.5 + ce[2] / (1 / 3)) / 7
    assert float(rec.loss) == pytest.approx(expect, rel=1e-6)
    assert float(rec.elbo) == pytest.approx(expect, rel=1e-6)
    assert rec.nll_BL[0, 2].item() == pytest.approx(ce[1], rel=1e-6) and rec.nll_BL[0, 1] == 0
    uni = diffusion_loss(logits, tokens, m, "uniform")
    assert float(uni.loss) == pytest.approx(sum(ce) / 3, rel=1e-6)
    assert float(uni.elbo) == pytest.approx(expect, rel=1e-6)   # evaluation always reports the ELBO
    num, cnt = loss_by_ratio_bin(rec, 10)
    assert cnt[5] == 4 and cnt[3] == 3 and cnt.sum() == 7
    assert float(num.sum() / cnt.sum()) == pytest.approx(expect, rel=1e-6)
