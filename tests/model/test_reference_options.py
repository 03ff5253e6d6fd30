"""The reference-compatible options (issue 15), each against hand-computed values:
capacity rounding, gate scaling by name, the stable loss, and batch-scope EC capacity."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import yaml

from model.config import ConfigError, ModelConfig, MoEConfig, from_dict
from model.diffusion import Masked, diffusion_loss
from model.moe.capacity import TimestepCapacity, build_capacity, check_flop_match
from model.moe.layer import MoELayer
from model.moe.routing import expert_choice, gate_scale_table

L = 512
SHAPES = {"linear": lambda r: r, "linear_reverse": lambda r: 1 - r, "bell": lambda r: 4 * r * (1 - r)}


def exact_k(schedule: str, m: int, half_even: bool) -> int:
    """k at r = m / L from exact rationals: 8 + 24 s(r), rounded by hand."""
    x = 8 + 24 * SHAPES[schedule](Fraction(m, L))
    lo = math.floor(x)
    if x - lo != Fraction(1, 2):
        return lo + (x - lo > Fraction(1, 2))
    return lo + (lo % 2) if half_even else lo + 1


# ---- 1. capacity rounding ------------------------------------------------------------------------
@pytest.mark.parametrize("schedule,ties", [("linear", [96, 224, 352, 480]),
                                           ("linear_reverse", [32, 160, 288, 416]),
                                           ("bell", None)])
def test_rounding_at_every_realizable_ratio(schedule, ties):
    r = torch.arange(L + 1, dtype=torch.float32) / L   # as mask_tokens computes r: float32
    up = TimestepCapacity(schedule, 8, 32).k(r).tolist()
    even = TimestepCapacity(schedule, 8, 32, rounding="half_even").k(r).tolist()
    assert up == [exact_k(schedule, m, False) for m in range(L + 1)]
    assert even == [exact_k(schedule, m, True) for m in range(L + 1)]
    differ = [m for m in range(L + 1) if up[m] != even[m]]
    assert len(differ) == 4 and all(up[m] - even[m] == 1 for m in differ)
    if ties is not None:   # linear: 8 + 3m/64 is x.5 at m = 32 mod 64, and rounds apart when x is even
        assert differ == ties


def test_linear_at_96_of_512_is_12_or_13():
    r = torch.tensor([96 / 512])
    assert TimestepCapacity("linear", 8, 32).k(r).item() == 13
    assert TimestepCapacity("linear", 8, 32, rounding="half_even").k(r).item() == 12


def test_expected_k_and_flop_match_follow_the_rounding():
    # s(r) = 1/2 everywhere: raw k = 1 + 3 * 0.5 = 2.5 for every r, so E[k] is the rounded value
    flat = dict(points=[[0, 0.5], [1, 0.5]])
    assert TimestepCapacity("piecewise", 1, 4, **flat).expected_k() == 3.0
    assert TimestepCapacity("piecewise", 1, 4, rounding="half_even", **flat).expected_k() == 2.0
    base = {"num_experts": 8, "k": 2, "capacity": {"schedule": "piecewise", "k_min": 1, "k_max": 4, **flat}}
    cfg = from_dict(ModelConfig, {"moe": {**base, "capacity": {**base["capacity"], "rounding": "half_even"}}})
    assert cfg.capacity.rounding == "half_even" and cfg.capacity.expected_k() == 2.0
    with pytest.raises(ConfigError, match="expected k=3.000"):   # half up: E[k] = 3, not k_target 2
        from_dict(ModelConfig, {"moe": base})
    # static k_target 2.5: 3 half up, 2 half to even
    for rounding, k in (("half_up", 3), ("half_even", 2)):
        c = from_dict(ModelConfig, {"moe": {"num_experts": 8, "k": 2, "capacity": {
            "schedule": "static", "k_target": 2.5, "rounding": rounding}}})
        assert c.capacity.k(torch.tensor([0.3])).item() == k


def test_rounding_passes_through_build_and_solve():
    moe = {"num_experts": 64, "k": 20, "capacity": {"schedule": "linear_reverse", "k_min": 8, "k_max": 40,
                                                    "flop_match": "solve", "rounding": "half_even"}}
    cfg = from_dict(ModelConfig, {"moe": moe})
    assert cfg.capacity.rounding == "half_even"
    assert cfg.capacity.expected_k() == pytest.approx(20, rel=0.01)
    assert build_capacity(cfg.moe).rounding == "half_even"
    check_flop_match(cfg.capacity, cfg.moe.capacity)   # no error


def test_bad_rounding_names_the_field():
    with pytest.raises(ConfigError, match=r"moe\.capacity\.rounding='nearest' must be one of half_up, half_even"):
        from_dict(ModelConfig, {"moe": {"capacity": {"rounding": "nearest"}}})


# ---- 2. gate scaling by name ---------------------------------------------------------------------
def test_reference_gate_scale_values():
    f = gate_scale_table(32, method="reference", num_shared=2)
    assert f[1].item() == pytest.approx(math.sqrt(2), abs=1e-6)   # one expert: ||g|| = 1
    for n, want in ((8, 3.03), (20, 4.43), (32, 5.43)):   # EC-DLM's figures for S = 2
        assert f[n].item() == pytest.approx(want, rel=0.01)
    # without sqrt(S), reference is E[1/||g||] >= E[||g||^2]^(-1/2) (Jensen), 1-4% apart at n = 8
    rms = gate_scale_table(32)
    ratio = f[8].item() / math.sqrt(2) / rms[8].item()
    assert 1.01 < ratio < 1.04


def test_reference_scaling_multiplies_gates_by_table_of_pick_count():
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 4)
    plain = expert_choice(logits, 2)
    scaled = expert_choice(logits, 2, gate_scaling="reference", num_shared=3)
    f = gate_scale_table(4, method="reference", num_shared=3)
    n_T = plain.mask.reshape(16, 4).sum(-1)
    want = plain.gates.reshape(16, 4) * f[n_T][:, None]
    assert torch.allclose(scaled.gates.reshape(16, 4), want)
    assert torch.equal(expert_choice(logits, 2, gate_scaling="rms").gates,
                       expert_choice(logits, 2, gate_scaling=True).gates)
    assert torch.equal(expert_choice(logits, 2, gate_scaling="off").gates, plain.gates)


@pytest.mark.parametrize("given,resolved", [(False, "off"), (True, "rms"), ("off", "off"), ("rms", "rms"),
                                            ("reference", "reference")])
def test_gate_scaling_names_and_boolean_aliases(given, resolved):
    cfg = from_dict(ModelConfig, {"moe": {"num_shared_experts": 1, "gate_scaling": given}})
    assert cfg.moe.gate_scaling == resolved


def test_gate_scaling_round_trips_through_saved_yaml(tmp_path):
    from rundir.config import load_config, save_config
    old = tmp_path / "old.yaml"   # a config saved before the names: a boolean
    old.write_text(yaml.safe_dump({"moe": {"gate_scaling": True, "num_shared_experts": 1}}))
    for value, want in ((True, "rms"), ("reference", "reference"), ("off", "off")):
        cfg = load_config(str(old), (f"moe.gate_scaling={value}",))
        assert cfg.moe.gate_scaling == want
        save_config(cfg, str(tmp_path / "config.yaml"))
        again = load_config(str(tmp_path / "config.yaml"))
        assert again.moe.gate_scaling == want and again.to_dict() == cfg.to_dict()


def test_gate_scaling_bad_values_name_the_field():
    with pytest.raises(ConfigError, match=r"moe\.gate_scaling='sqrt' must be one of off, rms, reference"):
        from_dict(ModelConfig, {"moe": {"gate_scaling": "sqrt"}})
    with pytest.raises(ConfigError, match=r"moe\.gate_scaling=reference needs moe\.num_shared_experts >= 1"):
        from_dict(ModelConfig, {"moe": {"gate_scaling": "reference"}})


# ---- 3. the stable loss --------------------------------------------------------------------------
def test_stable_loss_divides_by_all_maskable_tokens():
    # V = 3; logits [a, 0, 0] with target 0 give CE = ln(e^a + 2) - a; target 1 gives ln(e^a + 2)
    tokens = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 2]])
    mask = torch.tensor([[True, False, False, False], [True, True, False, False]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])   # one pad
    ratio = torch.tensor([1 / 4, 2 / 3])
    masked = Masked(tokens.masked_fill(mask, 2), mask, ratio, valid)
    a = torch.tensor([1.0, 2.0, 0.5])   # one row per masked position, row-major
    logits = torch.zeros(3, 3)
    logits[:, 0] = a
    ce = [math.log(math.exp(1.0) + 2) - 1.0,   # seq 0 pos 0, target 0
          math.log(math.exp(2.0) + 2),         # seq 1 pos 0, target 1
          math.log(math.exp(0.5) + 2) - 0.5]   # seq 1 pos 1, target 0
    maskable = 7
    stable = diffusion_loss(logits, tokens, masked, "stable")
    assert stable.loss.item() == pytest.approx(sum(ce) / maskable, rel=1e-6)
    uniform = diffusion_loss(logits, tokens, masked, "uniform")
    assert uniform.loss.item() == pytest.approx(sum(ce) / 3, rel=1e-6)
    elbo = (ce[0] * 4 + (ce[1] + ce[2]) * 1.5) / maskable
    assert stable.elbo.item() == pytest.approx(elbo, rel=1e-6)   # the ELBO is still what is reported
    cfg = from_dict(ModelConfig, {"diffusion": {"loss_weighting": "stable"}})
    assert cfg.diffusion.loss_weighting == "stable"


# ---- 4. batch-scope capacity ---------------------------------------------------------------------
@pytest.mark.parametrize("valid,want_sum,want_max", [
    (None, 8, 12),                 # L_B = [8, 8]: floor((8 + 24) / 4) = 8; floor(2 * 8 * 3 / 4) = 12
    ([8, 6], 6, 10),               # L_B = [8, 6]: floor((8 + 18) / 4) = 6; floor(14 * 3 / 4) = 10
])
def test_batch_capacity_sum_and_reference_max(valid, want_sum, want_max):
    torch.manual_seed(1)
    logits = torch.randn(2, 8, 4)
    k_B = torch.tensor([1, 3])
    valid_BL = None if valid is None else torch.arange(8)[None, :] < torch.tensor(valid)[:, None]
    c_sum = expert_choice(logits, k_B, valid_BL, scope="batch").token_idx.shape[1]
    c_max = expert_choice(logits, k_B, valid_BL, scope="batch", batch_capacity="reference_max").token_idx.shape[1]
    assert (c_sum, c_max) == (want_sum, want_max)


def test_batch_capacity_option_reaches_the_layer():
    moe = from_dict(MoEConfig, {"num_experts": 4, "expert_hidden": 8, "k": 2, "ec_scope": "batch",
                                "ec_batch_capacity": "reference_max",
                                "capacity": {"schedule": "linear", "k_min": 1, "k_max": 3}})
    layer = MoELayer(16, moe)
    x = torch.randn(2, 8, 16)
    out = layer(x, torch.tensor([0.0, 1.0]))   # k_B = [1, 3]: c = floor(16 * 3 / 4) = 12 per expert
    assert out.stats.assignments.item() == 4 * 12
    with pytest.raises(ConfigError, match=r"moe\.ec_batch_capacity='max' must be one of sum, reference_max"):
        from_dict(ModelConfig, {"moe": {"ec_batch_capacity": "max"}})
