import pytest
import torch

from model import ConfigError, DiffusionTransformer, ModelConfig, forward_loss, from_dict


def tiny(router="expert_choice", **model_kw):
    moe = {"router": router, "num_experts": 8, "expert_hidden": 32, "k": 2, "num_shared_experts": 1}
    if router == "expert_choice":
        moe["capacity"] = {"schedule": "linear_reverse", "k_min": 1, "k_max": 3}
    return from_dict(ModelConfig, {"model": {"vocab_size": 64, "d_model": 64, "n_layers": 2, "n_heads": 4,
                                             "max_seq_len": 32, **model_kw}, "moe": moe})


@pytest.mark.parametrize("router", ["expert_choice", "token_choice", "dense"])
def test_param_counts_from_config_match_the_module(router):
    cfg = tiny(router, n_kv_heads=2)
    model = DiffusionTransformer(cfg)
    assert cfg.param_counts()["total"] == sum(p.numel() for p in model.parameters())
    counts = cfg.param_counts()
    if router == "dense":
        assert counts["active"] == counts["total"]
    else:   # active counts k of the 8 experts per MoE layer
        expert = 3 * 64 * 32
        assert counts["total"] - counts["active"] == 2 * (8 - 2) * expert


def test_pads_do_not_change_valid_positions():
    """Key-padding mask: what sits in pad positions never leaks into real tokens."""
    model = DiffusionTransformer(tiny()).eval()
    tokens = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[:, 12:] = False
    other = tokens.clone()
    other[:, 12:] = 7
    r = torch.tensor([0.3, 0.6])
    a = model(tokens, r, valid).logits
    b = model(other, r, valid).logits
    torch.testing.assert_close(a[valid], b[valid])


def test_bidirectional_attention_sees_the_future():
    model = DiffusionTransformer(tiny("dense")).eval()
    tokens = torch.randint(4, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    later = tokens.clone()
    later[0, -1] = (tokens[0, -1] + 1) % 60 + 4
    assert not torch.allclose(model(tokens).logits[0, 0], model(later).logits[0, 0])


def test_logit_softcap_bounds_logits():
    cfg = tiny("dense", logit_softcap=2.0)
    model = DiffusionTransformer(cfg)
    with torch.no_grad():
        model.head.weight.mul_(1000)
    logits = model(torch.randint(4, 64, (1, 8))).logits
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"moe.k=80 exceeds moe.num_experts=64"):
        from_dict(ModelConfig, {"moe": {"num_experts": 64, "k": 80}})
    with pytest.raises(ConfigError, match=r"unknown config key model.d_modle"):
        from_dict(ModelConfig, {"model": {"d_modle": 3}})
    with pytest.raises(ConfigError, match=r"model.n_layers='four' must be an integer"):
        from_dict(ModelConfig, {"model": {"n_layers": "four"}})
    with pytest.raises(ConfigError, match=r"moe.router='topk' must be one of"):
        from_dict(ModelConfig, {"moe": {"router": "topk"}})
    with pytest.raises(ConfigError, match=r"model.n_kv_heads=3 must divide model.n_heads=8"):
        from_dict(ModelConfig, {"model": {"n_kv_heads": 3}})


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_tiny_model_overfits_one_batch(router):
    """The same batch and noise every step: the ELBO must fall by 90% within 300 steps.

    t stays at or below 0.7 so no sequence is fully masked: with RoPE as the only position
    signal, an all-mask input has identical values at every position, so nothing can tell its
    positions apart and its loss has a floor that no amount of training removes."""
    torch.manual_seed(0)
    cfg = tiny(router, d_model=128)
    model = DiffusionTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    tokens = torch.randint(4, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    u, token_u = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64), torch.rand(4, 32, generator=g, dtype=torch.float64)
    elbos = []
    for _ in range(300):
        res = forward_loss(model, tokens, u, token_u)
        loss, rec, out = res.loss, res.diffusion, res.output
        opt.zero_grad()
        loss.backward()
        opt.step()
        elbos.append(float(rec.elbo))
    final = sum(elbos[-10:]) / 10
    assert final < 0.1 * elbos[0], f"ELBO {elbos[0]:.3f} -> {final:.3f}"
    assert len(out.moe) == 2 and all(float(s.mean_k) > 0 for s in out.moe)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    tokens = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    u, token_u = torch.tensor([0.3, 0.6], dtype=torch.float64), torch.rand(2, 16, dtype=torch.float64)
    grads = []
    for ckpt in (False, True):
        model = DiffusionTransformer(tiny(activation_checkpointing=ckpt), seed=5).train()
        loss = forward_loss(model, tokens, u, token_u).loss
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
