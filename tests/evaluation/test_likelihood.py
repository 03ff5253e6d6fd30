"""Monte-Carlo ELBO against the exact expectation over every mask subset, on a tiny real model."""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from tests.evaluation.conftest import FixedLogits, tiny_config, tiny_model
from evaluation.likelihood import elbo_loglik, random_subsets, stratified_counts

PROMPT, ANSWER = [5, 6, 7], [8, 9, 10]


def exact_negative_elbo(model, prompt, answer) -> float:
    """E over k ~ U{1..L} and the C(L, k) subsets of (L / k) * sum of masked -log p, by enumeration."""
    L, mask_id = len(answer), model.cfg.model.mask_id
    total = 0.0
    for k in range(1, L + 1):
        subsets = list(itertools.combinations(range(L), k))
        for subset in subsets:
            x = torch.tensor([prompt + [mask_id if j in subset else a for j, a in enumerate(answer)]])
            with torch.no_grad():
                r = torch.tensor([k / (len(prompt) + L)])   # masked / whole sequence, as in pretraining
                logp = F.log_softmax(model(x, r).logits[0].double(), -1)
            nll = -sum(float(logp[len(prompt) + j, answer[j]]) for j in subset)
            total += (L / k) * nll / len(subsets) / L
    return total


def test_estimate_agrees_with_the_exact_expectation():
    # a larger init makes the predictions depend on the context, so the samples really vary
    model = tiny_model("expert_choice", vocab=12, init_std=0.6)
    exact = -exact_negative_elbo(model, PROMPT, ANSWER)
    estimates = [elbo_loglik(model, PROMPT, ANSWER, mc_num=96, batch_size=96,
                             generator=torch.Generator().manual_seed(s)) for s in range(20)]
    for est in estimates:
        assert est.stderr > 0
        assert abs(est.loglik - exact) < 3 * est.stderr, (est, exact)
    # the reported standard error is the actual spread of the estimate (within sampling noise)
    spread = torch.tensor([e.loglik for e in estimates]).std().item()
    mean_se = sum(e.stderr for e in estimates) / len(estimates)
    assert 0.5 < spread / mean_se < 2.0, (spread, mean_se)
    # more samples, closer
    big = elbo_loglik(model, PROMPT, ANSWER, mc_num=960, batch_size=320, generator=torch.Generator().manual_seed(99))
    assert abs(big.loglik - exact) < 3 * big.stderr and big.stderr < mean_se


def test_counts_are_stratified_and_subsets_uniform():
    k = stratified_counts(3, 30, torch.Generator().manual_seed(0))
    assert sorted(torch.bincount(k).tolist()[1:]) == [10, 10, 10]
    g = torch.Generator().manual_seed(0)
    m = random_subsets(torch.full((6000,), 2), 4, g)
    assert (m.sum(1) == 2).all()
    assert torch.allclose(m.float().mean(0), torch.full((4,), 0.5), atol=0.03)   # each position with prob k/L


def test_prompt_is_never_masked_and_the_ratio_is_over_the_whole_sequence():
    model = FixedLogits(torch.zeros(8, 12), tiny_config("dense", vocab=12))
    elbo_loglik(model, PROMPT, ANSWER + [4, 5], mc_num=16, batch_size=8)
    for call in model.calls:
        x, r = call["tokens"], call["ratio"]
        assert (x[:, :3] == torch.tensor(PROMPT)).all()
        assert torch.equal(r, (x[:, 3:] == 3).sum(1).float() / 8)   # 3 prompt + 5 answer positions


def test_uniform_model_gives_l_log_v():
    """Zero logits: every masked token costs log V, so the ELBO is exactly -L log V, stderr 0."""
    model = FixedLogits(torch.zeros(8, 12), tiny_config("dense", vocab=12))
    est = elbo_loglik(model, PROMPT, ANSWER, mc_num=12, batch_size=12)
    assert abs(est.loglik + 3 * math.log(12)) < 1e-9 and est.stderr < 1e-9
