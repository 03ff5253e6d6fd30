"""Routing against brute-force references: loops and sorts, no shared code with the implementation."""
import math

import pytest
import torch

from model.moe.routing import expert_choice, switch_aux_loss, token_choice, update_expert_bias, z_loss
from model.moe.routing import gate_scale_table


def brute_force_ec(logits_BLE, k_B, valid_BL, scope):
    """Dense mask and gates by explicit loops: each expert sorts the candidate tokens."""
    B, L, E = logits_BLE.shape
    mask = torch.zeros(B, L, E, dtype=torch.bool)
    if scope == "sequence":
        for b in range(B):
            Lb = int(valid_BL[b].sum())
            c = max(math.floor(Lb * int(k_B[b]) / E), 1) if Lb else 0
            cand = [i for i in range(L) if valid_BL[b, i]]
            for e in range(E):
                ranked = sorted(cand, key=lambda i: -float(logits_BLE[b, i, e]))
                for i in ranked[:c]:
                    mask[b, i, e] = True
    else:
        T = int(valid_BL.sum())
        c = max(math.floor(sum(int(valid_BL[b].sum()) * int(k_B[b]) for b in range(B)) / E), 1)
        cand = [(b, i) for b in range(B) for i in range(L) if valid_BL[b, i]]
        assert c <= T
        for e in range(E):
            ranked = sorted(cand, key=lambda bi: -float(logits_BLE[bi[0], bi[1], e]))
            for b, i in ranked[:c]:
                mask[b, i, e] = True
    gates = torch.zeros(B, L, E)
    for b in range(B):
        for i in range(L):
            picked = [e for e in range(E) if mask[b, i, e]]
            if picked:
                s = torch.tensor([float(logits_BLE[b, i, e]) for e in picked], dtype=torch.float64)
                for e, g in zip(picked, torch.softmax(s, 0)):
                    gates[b, i, e] = float(g)
    return mask, gates


@pytest.mark.parametrize("scope", ["sequence", "batch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expert_choice_matches_brute_force_with_pads(scope, seed):
    g = torch.Generator().manual_seed(seed)
    B, L, E = 3, 12, 5
    logits = torch.randn(B, L, E, generator=g)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 9:] = False
    valid[2, 4:] = False
    k_B = torch.tensor([2, 3, 1])
    r = expert_choice(logits, k_B, valid, scope=scope)
    mask, gates = brute_force_ec(logits, k_B, valid, scope)
    assert torch.equal(r.mask, mask)
    torch.testing.assert_close(r.gates, gates, rtol=1e-5, atol=1e-6)
    assert not r.mask[~valid].any(), "a pad position was picked"


def test_expert_choice_static_matches_brute_force_and_exact_capacity():
    g = torch.Generator().manual_seed(3)
    B, L, E, k = 4, 16, 8, 3
    logits = torch.randn(B, L, E, generator=g)
    r = expert_choice(logits, k)
    mask, gates = brute_force_ec(logits, torch.full((B,), k), torch.ones(B, L, dtype=torch.bool), "sequence")
    assert torch.equal(r.mask, mask)
    torch.testing.assert_close(r.gates, gates, rtol=1e-5, atol=1e-6)
    c = L * k // E
    assert (r.mask.sum(1) == c).all(), "every expert takes exactly c_b tokens of every sequence"
    assert r.capacity_static and r.token_idx.shape == (E, B * c)


def test_gates_sum_to_one_over_picking_experts_and_unrouted_fraction():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 32, 8, generator=g)
    r = expert_choice(logits, 2)
    picked = r.mask.any(-1)
    sums = r.gates.sum(-1)
    torch.testing.assert_close(sums[picked], torch.ones(int(picked.sum())))
    assert (sums[~picked] == 0).all()
    assert float(r.drop_frac) == pytest.approx(float((~picked).float().mean()))


def test_variable_k_gives_each_sequence_its_own_capacity():
    logits = torch.randn(3, 20, 4, generator=torch.Generator().manual_seed(5))
    r = expert_choice(logits, torch.tensor([1, 2, 4]))
    per_seq = r.mask.sum(1)   # [B, E]
    assert per_seq.tolist() == [[5] * 4, [10] * 4, [20] * 4]


def test_capacity_is_at_least_one_and_empty_sequence_gets_none():
    logits = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(6))
    valid = torch.zeros(2, 8, dtype=torch.bool)
    valid[0, :3] = True   # floor(3 * 1 / 16) = 0 -> 1
    r = expert_choice(logits, 1, valid)
    assert (r.mask[0].sum(0) == 1).all()
    assert not r.mask[1].any()


def test_gate_scaling_multiplies_by_table_of_pick_count():
    logits = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(7))
    plain, scaled = expert_choice(logits, 2), expert_choice(logits, 2, gate_scaling=True)
    f = gate_scale_table(4)
    n = plain.mask.sum(-1)
    torch.testing.assert_close(scaled.gates, plain.gates * f[n][..., None])
    assert f[1] == 1.0 and f[2] > 1.0 and f[4] > f[2]


# ---- token choice --------------------------------------------------------------------------------
def test_token_choice_top_k_and_renormalized_gates():
    logits = torch.randn(10, 6, generator=torch.Generator().manual_seed(8))
    r = token_choice(logits, 2)
    probs = torch.softmax(logits, -1)
    top = probs.topk(2, -1)
    expect = torch.zeros(10, 6).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(r.gates, expect)
    assert (r.mask.sum(-1) == 2).all() and r.counts.sum() == 20


def test_token_choice_sigmoid_without_renormalization():
    logits = torch.randn(10, 6, generator=torch.Generator().manual_seed(9))
    r = token_choice(logits, 3, score_fn="sigmoid", renormalize=False)
    s = torch.sigmoid(logits)
    top = s.topk(3, -1)
    torch.testing.assert_close(r.gates, torch.zeros(10, 6).scatter(1, top.indices, top.values))


def test_token_choice_capacity_drops_lowest_scores():
    # 6 tokens all prefer expert 0 (k=1, E=2, cf=1 -> C = ceil(6*1/2) = 3): the 3 lowest go
    logits = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.0]])
    r = token_choice(logits, 1, capacity_factor=1.0)
    assert r.token_idx.shape == (2, 3)
    assert r.mask[:, 0].tolist() == [True, True, True, False, False, False]
    assert not r.mask[:, 1].any()
    assert float(r.drop_frac) == pytest.approx(0.5)


def test_token_choice_pads_route_nowhere():
    logits = torch.randn(8, 4, generator=torch.Generator().manual_seed(10))
    valid = torch.tensor([True] * 5 + [False] * 3)
    for cf in (None, 1.0):
        r = token_choice(logits, 2, cf, valid_T=valid)
        assert not r.mask[~valid].any()


def test_z_loss_and_switch_aux_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # lse: log 2 and log 4
    assert float(z_loss(logits)) == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)
    r = token_choice(logits, 1)   # token 0: tie -> expert 0 (topk picks the first); token 1: expert 0
    probs = torch.softmax(logits, -1)   # [[.5,.5],[.75,.25]] -> P = [.625, .375]
    f = r.tokens_per_expert / 2
    assert float(switch_aux_loss(probs, r)) == pytest.approx(2 * float((f * torch.tensor([0.625, 0.375])).sum()))
    assert f.tolist() == [1.0, 0.0]
    assert float(switch_aux_loss(probs, r)) == pytest.approx(1.25)


def test_expert_bias_moves_toward_balance_and_changes_selection_only():
    bias = torch.zeros(3)
    update_expert_bias(bias, torch.tensor([10.0, 4.0, 1.0]), rate=0.1)   # mean 5
    assert bias.tolist() == pytest.approx([-0.1, 0.1, 0.1])
    logits = torch.tensor([[1.0, 0.9, -3.0]])
    r = token_choice(logits, 1, expert_bias=torch.tensor([-1.0, 0.0, 0.0]), renormalize=False)
    assert r.mask[0].tolist() == [False, True, False]
    assert float(r.gates[0, 1]) == pytest.approx(float(torch.softmax(logits, -1)[0, 1]))   # unbiased gate
