"""model.attention (bidirectional | causal), model.head_dim and model.qk_norm (head | full |
true/false), the options an imported autoregressive MoE needs (issue 23); transformers' own models
are the reference in tests/evaluation/test_ar_moe_import.py."""
from __future__ import annotations

import pytest
import torch

from model import DiffusionTransformer, from_dict
from model.config import ConfigError, ModelConfig


def config(**model) -> ModelConfig:
    return from_dict(ModelConfig, {"model": {"vocab_size": 32, "d_model": 32, "n_layers": 2, "n_heads": 4,
                                             "n_kv_heads": 2, "max_seq_len": 16, **model},
                                   "moe": {"router": "token_choice", "num_experts": 4, "expert_hidden": 8, "k": 2}})


def test_causal_outputs_ignore_later_tokens_and_bidirectional_ones_do_not():
    ids = torch.randint(4, 32, (2, 10), generator=torch.Generator().manual_seed(0))
    later = ids.clone()
    later[:, 6:] = torch.randint(4, 32, (2, 4), generator=torch.Generator().manual_seed(1))
    for attention, same in (("causal", True), ("bidirectional", False)):
        model = DiffusionTransformer(config(attention=attention, init_std=0.3), seed=3).eval()
        with torch.no_grad():
            a, b = model(ids).logits[:, :6], model(later).logits[:, :6]
        assert torch.allclose(a, b, atol=1e-6) == same, attention


def test_causal_with_left_padding_has_no_nan_and_matches_the_unpadded_sequence():
    model = DiffusionTransformer(config(attention="causal", init_std=0.3), seed=3).eval()
    ids = torch.randint(4, 32, (1, 8), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    valid = torch.ones(1, 11, dtype=torch.bool)
    valid[0, :3] = False
    with torch.no_grad():
        out = model(padded, valid_BL=valid).logits
    assert torch.isfinite(out).all()
    # RoPE is relative: the padded sequence's valid part sees what the unpadded one sees
    with torch.no_grad():
        assert torch.allclose(out[:, 3:], model(ids).logits, atol=1e-5)


def test_head_dim_and_qk_norm_shapes_and_the_boolean_meaning():
    m = DiffusionTransformer(config(head_dim=16, qk_norm="full"))
    attn = m.blocks[0].attn
    assert attn.wq.weight.shape == (64, 32) and attn.wkv.weight.shape == (64, 32) and attn.wo.weight.shape == (32, 64)
    assert attn.q_norm.weight.shape == (64,) and attn.k_norm.weight.shape == (32,)
    assert config(head_dim=16, qk_norm="full").param_counts()["total"] == sum(p.numel() for p in m.parameters())
    a, b = DiffusionTransformer(config(qk_norm=True), seed=1), DiffusionTransformer(config(qk_norm="head"), seed=1)
    ids = torch.randint(4, 32, (1, 6))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert DiffusionTransformer(config(qk_norm=False)).blocks[0].attn.q_norm is None


@pytest.mark.parametrize("field,value,message", [
    ("attention", "sliding", "model.attention='sliding' must be one of"),
    ("qk_norm", "rms", "model.qk_norm='rms' must be one of"),
    ("head_dim", 7, "model.head_dim=7 must be even"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        config(**{field: value})
