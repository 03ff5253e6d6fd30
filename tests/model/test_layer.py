"""MoELayer: gradcheck in float64, and expert parallelism over 2 gloo ranks equals one process."""
import pytest
import torch
import torch.distributed as dist

from model import ModelConfig, from_dict
from model.moe.layer import MoELayer
from tests.distributed import run_distributed

D = 16

VARIANTS = {
    "ec_static": {"router": "expert_choice"},
    "ec_dynamic": {"router": "expert_choice", "capacity": {"schedule": "linear_reverse", "k_min": 1, "k_max": 3}},
    "ec_batch_scope": {"router": "expert_choice", "ec_scope": "batch",
                       "capacity": {"schedule": "cosine_reverse", "k_min": 1, "k_max": 3}},
    "tc_capacity": {"router": "token_choice", "capacity_factor": 1.0},
    "tc_dropless": {"router": "token_choice", "aux_loss_coef": 0.01},
    # k > ep: a rank's experts take more slots than it has tokens, so each token is sent once
    # per rank (AllToAllDispatcher.sends_tokens_once), with and without equal capacities
    "ec_static_k3": {"router": "expert_choice", "k": 3},
    "ec_dynamic_k3": {"router": "expert_choice", "k": 3,
                      "capacity": {"schedule": "linear_reverse", "k_min": 2, "k_max": 4}},
    "tc_capacity_k3": {"router": "token_choice", "capacity_factor": 1.0, "k": 3},
    "ec_static_e8_k5": {"router": "expert_choice", "num_experts": 8, "k": 5},   # once per rank at ep=4 too
}


def moe_cfg(variant: str):
    base = {"num_experts": 4, "expert_hidden": 8, "k": 2, "num_shared_experts": 1, "shared_expert_hidden": 6}
    return from_dict(ModelConfig, {"moe": {**base, **VARIANTS[variant]}}).moe


def make_layer(variant, ep_group=None):
    layer = MoELayer(D, moe_cfg(variant), ep_group)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))
        for p in layer.shared.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    layer.experts.init_weights(seed=1, layer=0, std_in=0.3, std_out=0.3)
    return layer


@pytest.mark.parametrize("variant", ["ec_static", "ec_dynamic", "tc_capacity", "tc_dropless"])
def test_gradcheck_float64(variant):
    """Gradients w.r.t. the input and every parameter (router, experts, shared) by finite
    differences; routing is locally constant, so small perturbations do not change it."""
    gradcheck_layer(variant)


@pytest.mark.parametrize("variant", ["ec_static", "ec_dynamic", "tc_capacity"])
def test_gradcheck_fused_path_one_expert_per_group(variant, monkeypatch):
    """On the CPU the fused local path (gather, experts, scatter in one node) makes its
    temporaries one group of experts at a time and gathers each group's rows again in the
    backward; with a 1-byte budget every expert is its own group, so every boundary is crossed."""
    from model.moe import experts
    monkeypatch.setattr(experts, "_GROUP_BYTES", 1)
    assert len(experts._expert_groups(4, 3, 16, torch.zeros(1))) == 4
    gradcheck_layer(variant)


def gradcheck_layer(variant):
    layer = make_layer(variant).double()
    x = torch.randn(2, 8, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    r = torch.tensor([0.2, 0.8])
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 6:] = False
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]

    def f(x, *ps):
        out = torch.func.functional_call(layer, dict(zip(names, ps)), (x, r, valid))
        return out.hidden, out.loss

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


def _ep_worker(rank, world, variant):
    torch.manual_seed(0)
    B, L = 3, 8
    g = torch.Generator().manual_seed(42)
    xs = [torch.randn(B, L, D, generator=g) for _ in range(world)]
    rs = [torch.rand(B, generator=g) for _ in range(world)]
    ws = [torch.randn(B, L, D, generator=g) for _ in range(world)]
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[2, 5:] = False   # pads make capacities differ: exercises the size exchange

    ep = make_layer(variant, dist.group.WORLD)
    full = make_layer(variant)
    x = xs[rank].clone().requires_grad_()
    out = ep(x, rs[rank], valid)
    ((out.hidden * ws[rank]).sum() + out.loss).backward()

    ref_out, ref_xgrad = None, None
    for src in range(world):   # the one-process reference sees every rank's tokens
        xr = xs[src].clone().requires_grad_()
        full.router.weight.grad = None   # experts accumulate over sources; the router must not
        for q in full.shared.parameters():   # nor the shared expert (it overlaps the all-to-all)
            q.grad = None
        o = full(xr, rs[src], valid)
        ((o.hidden * ws[src]).sum() + o.loss).backward()
        if src == rank:
            ref_out, ref_xgrad = o.hidden.detach(), xr.grad
            ref_router = full.router.weight.grad.clone()
            ref_shared = [q.grad.clone() for q in full.shared.parameters()]
    El = ep.experts.num_local
    sl = slice(rank * El, (rank + 1) * El)
    return {
        "out": (out.hidden.detach(), ref_out),
        "xgrad": (x.grad, ref_xgrad),
        "w_in_grad": (ep.experts.w_in_EDF.grad, full.experts.w_in_EDF.grad[sl]),
        "w_out_grad": (ep.experts.w_out_EHD.grad, full.experts.w_out_EHD.grad[sl]),
        "router_grad_own_tokens": (ep.router.weight.grad, ref_router),
        **{f"shared_grad_own_tokens/{i}": (q.grad, r) for i, (q, r) in enumerate(zip(ep.shared.parameters(),
                                                                                       ref_shared))},
    }


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_expert_parallel_equals_single_process(variant):
    check_expert_parallel(variant, 2)


@pytest.mark.parametrize("variant", ["ec_static", "ec_dynamic", "ec_static_e8_k5"])
def test_expert_parallel_over_4_ranks_equals_single_process(variant):
    """More than one other rank: the pipelined slot path and the once-per-rank path send to and
    receive from several sources (split and reassembled in rank order), with equal and with
    unequal capacities."""
    check_expert_parallel(variant, 4)


def check_expert_parallel(variant, world):
    results = run_distributed(_ep_worker, world, variant)
    for rank, res in enumerate(results):
        for name, (got, ref) in res.items():
            assert got is not None, f"rank {rank}: no {name}"
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} {name}: {m}")


def test_drop_in_layer_validates_and_initializes_itself():
    """Used outside our model: a raw MoEConfig gets its capacity defaults and the experts real weights."""
    from model.config import CapacityConfig, ConfigError, MoEConfig
    layer = MoELayer(32, MoEConfig(num_experts=8, expert_hidden=16, k=2,
                                   capacity=CapacityConfig(schedule="linear_reverse", k_min=1, k_max=3)))
    w = layer.experts.w_in_EDF.detach()
    assert torch.isfinite(w).all() and 0.01 < float(w.std()) < 0.03
    out = layer(torch.randn(2, 16, 32), torch.tensor([0.1, 0.9]))
    assert out.hidden.shape == (2, 16, 32) and out.stats.mean_k > 0
    with pytest.raises(ConfigError, match="moe.capacity.k_max=9 exceeds moe.num_experts=8"):
        MoELayer(32, MoEConfig(num_experts=8, capacity=CapacityConfig(schedule="linear", k_min=1, k_max=9)))


def test_dropless_experts_of_unaligned_width_take_the_loop():
    """torch._grouped_mm refuses row strides that are not multiples of 16 bytes (width 3 in
    fp32); such experts fall back to the per-expert loop and compute the same function."""
    import torch
    from model.moe.experts import Experts, swiglu
    ex = Experts(4, 8, 3, first_expert=0)
    ex.init_weights(0, 0, 0.02, 0.02)
    x = torch.randn(10, 8)
    expert_of_row = [0, 0, 0, 2, 2, 2, 2, 2, 3, 3]
    with torch.no_grad():
        out = ex.forward_ragged(x, torch.tensor([3, 0, 5, 2]))
        ref = torch.stack([swiglu(x[i] @ ex.w_in_EDF[e], None) @ ex.w_out_EHD[e] for i, e in enumerate(expert_of_row)])
    assert out.shape == (10, 8) and torch.allclose(out, ref, atol=1e-6)
