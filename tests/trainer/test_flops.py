"""FLOP counting (trainer/flops.py) against numbers worked out by hand for one tiny config.

The routed (token, expert) pairs come from a real forward of a real model, summed over its MoE
layers the way StepStats sums them; the expected counts are written out below from the routing
rules (EC capacity per sequence, TC top-k, TC capacity C = ceil(T k / E * cf)), not taken from
the code under test.

Tiny config: V=32, d=8, 2 heads of 4 (kv heads = heads), 2 layers, L=8, B=2 (T=16 tokens),
E=4 experts of width 4, k=2, one shared expert of width 4, moe_every=2 (layer 0 dense of width
k * 4 = 8, layer 1 MoE).

Multiply-accumulates per token (FLOPs = 2 x MACs, training = 3 x forward):
  attention projections  q, o: 2 * 8*8 = 128;  k, v: 2 * 8*(2*4) = 128      -> 256 per layer
  attention scores       QK^T and AV: 2 * L * heads * head_dim = 2*8*2*4     -> 128 per layer
  dense SwiGLU (width 8) 3 * 8*8                                             -> 192
  MoE layer router       E * d = 4*8                                         ->  32
  shared expert          3 * 8*4                                             ->  96
  so per token: 2 * (256 + 128) + 192 + 32 + 96 = 1088 (MoE model), 2 * (256 + 128) + 2 * 192 = 1152 (dense)
  one routed assignment  3 * 8*4 = 96;   the output head, per masked token: 8*32 = 256

Masks: token_u[b, j] = (j + 0.5) / 8 and t_b = (1 - 1e-3) u_b + 1e-3 with u = (0.125, 0.5), so
sequence 0 masks the j with (j + .5)/8 < 0.1259: 1 token (r = 1/8); sequence 1 the j with
(j + .5)/8 < 0.5005: 4 tokens (r = 4/8). M = 5 masked tokens.
"""
import math

import pytest
import torch

from model import DiffusionTransformer
from model.config import (CapacityConfig, DiffusionConfig, ModelArchConfig, ModelConfig, MoEConfig)
from model.diffusion import forward_loss
from trainer.flops import forward_flops, train_flops

B, L, T, MASKED = 2, 8, 16, 5


def tiny(**moe) -> ModelConfig:
    base = dict(num_experts=4, expert_hidden=4, k=2, num_shared_experts=1, moe_every=2, z_loss_coef=0.0)
    base.update(moe)
    return ModelConfig(model=ModelArchConfig(vocab_size=32, d_model=8, n_layers=2, n_heads=2, max_seq_len=L),
                       moe=MoEConfig(**base), diffusion=DiffusionConfig(eps=1e-3))


def measured(cfg: ModelConfig, before=None):
    """(routed assignments summed over MoE layers, masked tokens) of one real forward."""
    model = DiffusionTransformer(cfg, seed=0)
    if before:
        before(model)
    tokens = torch.randint(4, 32, (B, L), generator=torch.Generator().manual_seed(0))
    token_u = ((torch.arange(L, dtype=torch.float64) + 0.5) / L).expand(B, L)
    with torch.no_grad():
        fwd = forward_loss(model, tokens, torch.tensor([0.125, 0.5], dtype=torch.float64), token_u)
    assert fwd.diffusion.ratio_B.tolist() == [1 / 8, 4 / 8]   # the masks the docstring works out
    routed = sum(float(st.assignments) for st in fwd.output.moe)
    return routed, float(fwd.diffusion.mask_BL.sum())


def check(cfg: ModelConfig, routed_expected: float, train_expected: float, before=None):
    routed, masked = measured(cfg, before)
    assert masked == MASKED
    assert routed == routed_expected
    got = train_flops(cfg, T, L, masked, routed)
    assert got == pytest.approx(train_expected, rel=1e-12)
    assert forward_flops(cfg, T, L, masked, routed) * 3 == pytest.approx(got, rel=1e-12)


def test_arithmetic_without_a_forward():
    """The formula alone, at round numbers: 10 tokens, 7 assignments, 3 masked."""
    assert forward_flops(tiny(), 10, L, 3, 7) == 2 * (1088 * 10 + 96 * 7 + 256 * 3)   # = 2 * 12320
    assert forward_flops(tiny(), 10, L, 3, 7) == 24640
    # attention scores scale with the sequence length: L=4 halves them, 2 layers * 2*4*2*4 = 128 per token
    assert forward_flops(tiny(), 10, 4, 3, 7) == 24640 - 2 * 10 * 128


def test_expert_choice_static():
    """Static k=2: every expert picks c = floor(L k / E) = floor(8*2/4) = 4 tokens per sequence,
    so E * B * c = 4*2*4 = 32 assignments (= T k)."""
    routed = 4 * 2 * 4
    check(tiny(), routed, 3 * 2 * (1088 * 16 + 96 * routed + 256 * MASKED))
    assert 3 * 2 * (1088 * 16 + 96 * 32 + 256 * 5) == 130560


def test_expert_choice_dynamic_capacity():
    """linear_reverse, k from 1 to 3: k_b = floor(1 + 2 (1 - r_b) + 0.5), clamped to [1, 3].
    r = 1/8: floor(3.25) = 3;  r = 4/8: floor(2.5) = 2.  c_b = floor(8 k_b / 4) = 6 and 4, so the
    layer computes E * (6 + 4) = 40 assignments, not the nominal T k = 32."""
    cfg = tiny(capacity=CapacityConfig(schedule="linear_reverse", k_min=1, k_max=3))
    routed = 4 * (6 + 4)
    check(cfg, routed, 3 * 2 * (1088 * 16 + 96 * routed + 256 * MASKED))
    assert 3 * 2 * (1088 * 16 + 96 * 40 + 256 * 5) == 135168


def test_token_choice_dropless():
    """Every token's top-2: T k = 16*2 = 32 assignments, whatever the load."""
    routed = 16 * 2
    check(tiny(router="token_choice"), routed, 3 * 2 * (1088 * 16 + 96 * routed + 256 * MASKED))


def test_token_choice_with_capacity_counts_the_kept_assignments():
    """Capacity factor 1: C = ceil(T k / E * 1) = ceil(16*2/4) = 8 slots per expert. A selection
    bias of +10 on experts 0 and 1 (softmax scores are below 1) sends every token to both, load
    (16, 16, 0, 0): each keeps 8, so 16 assignments are computed and 16 dropped (drop_frac 0.5).
    Experts 2 and 3's 2*8 empty slots are computed (fixed [E, C] shapes) but not counted:
    Routing.num_assignments counts kept slots, while flops.py's docstring says padding slots are
    included. This pins what the code does; which of the two is meant is an open question."""
    def favour_experts_0_and_1(model):
        for layer in model.moe_layers():
            layer.expert_bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))
    cfg = tiny(router="token_choice", capacity_factor=1.0, bias_update_rate=1e-3)
    routed = min(16, 8) + min(16, 8) + min(0, 8) + min(0, 8)
    check(cfg, routed, 3 * 2 * (1088 * 16 + 96 * routed + 256 * MASKED), before=favour_experts_0_and_1)
    assert 3 * 2 * (1088 * 16 + 96 * 16 + 256 * 5) == 121344


def test_dense():
    """No router, no experts: both layers are SwiGLUs of width k * 4 = 8; 1152 MACs per token."""
    check(tiny(router="dense"), 0, 3 * 2 * (1152 * 16 + 256 * MASKED))
    assert 3 * 2 * (1152 * 16 + 256 * 5) == 118272


def test_dense_floor_equals_moe_with_the_same_active_width():
    """The method's floor: a routed expert at T k assignments costs what a dense SwiGLU of width
    k * h_e costs on T tokens (3*8*4 per assignment * 2 per token = 3*8*8 per token)."""
    moe, dense = tiny(moe_every=1, num_shared_experts=0), tiny(router="dense")
    router_macs = 2 * 4 * 8   # two MoE layers' routers, the only difference
    assert forward_flops(moe, T, L, MASKED, 2 * T * 2) - forward_flops(dense, T, L, MASKED, 0) \
        == 2 * router_macs * T
    assert math.isclose(train_flops(dense, T, L, MASKED, 0), 118272)
