"""Supervised fine-tuning's mask-ratio rule (issue 12): training, the sampler's rule and the
exported Hugging Face model compute the same mask ratios, hence the same expert-choice
capacities, on the same partly masked, prompted input; and the SFT objective never masks a prompt."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForMaskedLM

from evaluation.hf.export import write_hf_dir
from evaluation.inference import model_mask_ratio
from model import DiffusionTransformer
from model.diffusion import forward_loss, mask_ratio, mask_tokens
from tests.evaluation.conftest import tiny_config
from tests.evaluation.test_hf import strong_random_state

MASK = 3


def sft_config(**kw):
    cfg = tiny_config("expert_choice", max_seq_len=24, **kw)   # linear_reverse k 1..3: r decides k
    return dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, mask_ratio_over="response"))


def prompted_batch(seed: int = 0):
    """Three sequences with prompts of 3, 8 and 16 tokens, masked by the training rule at
    different t, one with two positions of left padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 32, (3, 24), generator=g)
    prompt = torch.zeros(3, 24, dtype=torch.bool)
    for b, p in enumerate((3, 8, 16)):
        prompt[b, :p] = True
    valid = torch.ones(3, 24, dtype=torch.bool)
    valid[1, :2] = False
    prompt[1, :2] = False
    masked = mask_tokens(tokens, torch.tensor([0.15, 0.5, 0.97]), torch.rand(3, 24, generator=g, dtype=torch.float64),
                         MASK, valid, prompt)
    return tokens, prompt, valid, masked


def test_the_rule_by_hand():
    # one pad, a prompt of 3 (positions 1-3), a response of 4 with 2 masked
    valid = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    prompt = torch.tensor([[0, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert mask_ratio(mask, valid, prompt, "sequence").item() == pytest.approx(2 / 7)
    assert mask_ratio(mask, valid, prompt, "response").item() == pytest.approx(2 / 4)
    assert mask_ratio(mask, valid, None, "response").item() == pytest.approx(2 / 7)   # no prompt: same rule
    with pytest.raises(ValueError, match="'sequence' or 'response'"):
        mask_ratio(mask, valid, prompt, "prompt")


def test_prompt_is_never_masked_and_carries_no_loss():
    cfg = sft_config()
    model = DiffusionTransformer(cfg, seed=0)
    tokens, prompt, valid, _ = prompted_batch()
    g = torch.Generator().manual_seed(3)
    for t in (0.999, 0.5, 0.01):
        fwd = forward_loss(model, tokens, torch.full((3,), t, dtype=torch.float64),
                           torch.rand(3, 24, generator=g, dtype=torch.float64), valid, prompt)
        rec = fwd.diffusion
        assert not rec.mask_BL[prompt].any() and (rec.nll_BL[prompt] == 0).all()
        assert rec.mask_BL.any(1).all()   # at least one response token masked per sequence
        torch.testing.assert_close(rec.ratio_B, rec.mask_BL.sum(1) / (valid & ~prompt).sum(1).float())
        assert int(rec.num_tokens) == int((valid & ~prompt).sum())   # the ELBO's normalizer: response tokens
    pre = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, mask_ratio_over="sequence"))
    with pytest.raises(ValueError, match="mask_ratio_over=response"):
        forward_loss(DiffusionTransformer(pre), tokens, torch.full((3,), 0.5, dtype=torch.float64),
                     torch.rand(3, 24, dtype=torch.float64), valid, prompt)


def test_training_sampler_and_hf_model_get_the_same_capacities(tmp_path):
    cfg = sft_config()
    model = DiffusionTransformer(cfg).eval()
    model.load_state_dict(strong_random_state(model, 7))
    tokens, prompt, valid, masked = prompted_batch()
    r_train = masked.ratio_B
    r_infer = model_mask_ratio(model, masked.noisy_BL, valid, prompt)
    torch.testing.assert_close(r_infer, r_train, rtol=0, atol=0)
    k_train = cfg.capacity.k(r_train)
    assert len(set(k_train.tolist())) > 1, "the three sequences must get different capacities"
    # the pretraining rule would give other capacities here: the test can tell the rules apart
    assert not torch.equal(cfg.capacity.k(mask_ratio(masked.mask_BL, valid, None, "sequence")), k_train)

    write_hf_dir(cfg, model.state_dict().items(), str(tmp_path / "hf"))
    hf = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    assert hf.config.ecdlm["diffusion"]["mask_ratio_over"] == "response"
    r_hf = hf.mask_ratio(masked.noisy_BL, valid, prompt)
    torch.testing.assert_close(r_hf, r_train, rtol=0, atol=0)
    with torch.no_grad():
        ref = model(masked.noisy_BL, r_train, valid).logits
        got = hf(masked.noisy_BL, attention_mask=valid.long(), prompt_mask=prompt).logits
    assert float((got - ref)[valid].abs().max()) < 1e-5   # same capacities, same selection, same logits
