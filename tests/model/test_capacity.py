import math

import pytest
import torch

from model import ConfigError, ModelConfig, from_dict
from model.moe.capacity import TimestepCapacity

R = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
EXPECTED_S = {   # s(0), s(0.5), s(1) from the definitions
    "linear": [0, 0.5, 1], "linear_reverse": [1, 0.5, 0], "cosine": [0, 0.5, 1],
    "cosine_reverse": [1, 0.5, 0], "bell": [0, 1, 0], "gaussian": [0, 1, 0], "gaussian_reverse": [1, 0, 1],
}


@pytest.mark.parametrize("schedule", sorted(EXPECTED_S))
def test_shape_at_0_half_1(schedule):
    cap = TimestepCapacity(schedule, 8, 32)
    assert cap.s(R).tolist() == pytest.approx(EXPECTED_S[schedule], abs=1e-12)


def test_k_is_rounded_and_clamped_long():
    cap = TimestepCapacity("linear", 8, 32)
    k = cap.k(torch.tensor([0.0, 0.01, 0.5, 0.52, 1.0]))
    assert k.dtype == torch.long
    assert k.tolist() == [8, 8, 20, 20, 32]   # 8.24 -> 8; 20.48 -> 20
    assert TimestepCapacity("static", 8, 8, k_static=20).k(R).tolist() == [20, 20, 20]


def test_piecewise_interpolates():
    cap = TimestepCapacity("piecewise", 4, 12, points=[[0, 1], [0.5, 0.25], [1, 0]])
    assert cap.s(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])).tolist() == pytest.approx([1, 0.625, 0.25, 0.125, 0])


@pytest.mark.parametrize("schedule", sorted(set(EXPECTED_S) - {"bell"}))
def test_builtin_schedules_match_k20(schedule):
    assert TimestepCapacity(schedule, 8, 32).expected_k() == pytest.approx(20, rel=0.01)


def test_bell_expects_24_and_is_refused_unless_solved():
    assert TimestepCapacity("bell", 8, 32).expected_k() == pytest.approx(24, rel=0.01)
    base = {"moe": {"num_experts": 64, "k": 20, "capacity": {"schedule": "bell", "k_min": 8, "k_max": 32}}}
    with pytest.raises(ConfigError) as err:
        from_dict(ModelConfig, base)
    msg = str(err.value)
    assert "24.0" in msg and "k_target=20" in msg, msg
    base["moe"]["capacity"]["flop_match"] = "solve"
    cfg = from_dict(ModelConfig, base)
    assert cfg.moe.capacity.k_max < 32
    assert TimestepCapacity("bell", 8, cfg.moe.capacity.k_max).expected_k() == pytest.approx(20, rel=0.01)


def test_expected_k_includes_rounding():
    # bell over k in {1, 2}: round(1 + s) = 2 where s >= 1/2, i.e. |r - 1/2| <= sqrt(1/8), so
    # E[k] = 1 + 2 sqrt(1/8) = 1.7071 (without the rounding it would be 1 + 2/3)
    assert TimestepCapacity("bell", 1, 2).expected_k() == pytest.approx(1 + 2 * math.sqrt(1 / 8), abs=1e-5)
    # a fractional k_max clamps at its floor: k in {1} only
    assert TimestepCapacity("linear", 1, 1.6).expected_k() == 1.0


def test_k_max_above_num_experts_names_field():
    with pytest.raises(ConfigError, match=r"moe.capacity.k_max=80 exceeds moe.num_experts=64"):
        from_dict(ModelConfig, {"moe": {"num_experts": 64, "k": 8,
                                        "capacity": {"schedule": "linear", "k_min": 8, "k_max": 80}}})


def test_flop_match_off_accepts_mismatch():
    cfg = from_dict(ModelConfig, {"moe": {"num_experts": 64, "k": 20, "capacity": {
        "schedule": "bell", "k_min": 8, "k_max": 32, "flop_match": "off"}}})
    assert cfg.moe.capacity.k_max == 32
    assert math.isclose(TimestepCapacity("bell", 8, 32).expected_k(), 24, rel_tol=0.01)
