"""torch.compile on one process: zero graph breaks for a block whose FFN is EC static, TC with
a capacity factor or dense (forward and backward, fullgraph=True), and for a dynamic capacity
schedule no recompilation after warm-up while the mask ratios change step to step. aot_eager
runs dynamo and AOTAutograd (where breaks and the backward graph come from) without inductor's
code generation, which tests/trainer/test_compile.py covers."""
import pytest
import torch
from torch._dynamo.utils import counters

from benchmarks.host_syncs import tiny_config
from model import DiffusionTransformer, forward_loss

BLOCK_CONFIGS = {"ec_static": lambda: tiny_config("expert_choice"),
                 "tc_cf1": lambda: tiny_config("token_choice", capacity_factor=1.0),
                 "dense": lambda: tiny_config("dense")}


def block_case(cfg, seed=0):
    torch.manual_seed(seed)
    model = DiffusionTransformer(cfg)
    x = torch.randn(2, 64, cfg.model.d_model)
    return model, model.blocks[1], x, (model.rope_cos, model.rope_sin), torch.rand(2)


def block_grads(fn, block, x):
    """Output, loss and every gradient of one forward + backward of fn(x) -> (hidden, loss)."""
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    hidden, loss = fn(x)
    (hidden.square().mean() + loss).backward()
    return [hidden.detach(), loss.detach(), x.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("name", sorted(BLOCK_CONFIGS))
def test_block_compiles_whole_forward_and_backward(name):
    model, block, x, rope, r = block_case(BLOCK_CONFIGS[name]())

    def step(x):
        out = block(x, rope, None, r, None)
        return out.hidden, out.loss
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")   # a break raises
    got, want = block_grads(compiled, block, x), block_grads(step, block, x)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1 and counters["aot_autograd"]["ok"] == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_dynamic_schedule_does_not_recompile_after_warm_up():
    """linear_reverse capacity, every block compiled as the trainer does, 30 training steps with
    fresh mask ratios: the capacities change step to step, yet after warm-up (the static first
    graph, then symbolic sizes) no new graph is made, and nothing breaks a graph."""
    cfg = tiny_config("expert_choice", "linear_reverse")
    torch.manual_seed(0)
    model = DiffusionTransformer(cfg)
    torch._dynamo.reset()
    counters.clear()
    for block in model.blocks:
        block.compile(backend="aot_eager")
    moe = model.moe_layers()[0]
    g = torch.Generator().manual_seed(0)
    sizes, graphs = set(), []
    for _ in range(30):
        tokens = torch.randint(4, cfg.model.vocab_size, (2, 64), generator=g)
        u, token_u = torch.rand(2, generator=g, dtype=torch.float64), torch.rand(2, 64, generator=g)
        rec = forward_loss(model, tokens, u, token_u)
        rec.loss.backward()
        sizes.add(moe.ec_sizes(rec.diffusion.ratio_B, None, 2, 64))
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(sizes) >= 5, sizes   # the run did exercise changing capacities
    assert graphs[10] == graphs[-1] and graphs[-1] <= 3, graphs
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["frames"]["total"] == graphs[-1]   # each frame compiled made a graph: no recompile loop


def test_token_choice_dropless_breaks_where_its_sizes_depend_on_data():
    """Counted, not hidden: without a grouped matmul the compiler accepts (bf16 on CUDA), the
    per-expert loop reads its counts back, which splits the block."""
    model, block, x, rope, r = block_case(tiny_config("token_choice"))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x: block(x, rope, None, r, None).hidden)(x)
    assert explained.graph_break_count >= 1
    assert any("_local_scalar_dense" in str(b.reason) or "item" in str(b.reason) or "tolist" in str(b.reason)
               for b in explained.break_reasons)


@pytest.mark.parametrize("with_gate", [True, False])
def test_the_fused_expert_node_is_a_registered_operator(with_gate):
    """ecdlm::local_fixed_experts (the one-process EC node a CPU compile keeps whole): its schema,
    fake (shape) function and autograd formula agree with what the op computes (opcheck), and its
    gradients equal the unfused path's (gather, forward_fixed, scatter-add in plain ops)."""
    from model.moe.experts import Experts, local_fixed_experts
    torch.manual_seed(0)
    T, D, E, H, C = 24, 8, 4, 6, 5
    experts = Experts(E, D, H)
    experts.init_weights(0, 0, 0.3, 0.3)
    idx = torch.stack([torch.randperm(T)[:C] for _ in range(E)])
    x = torch.randn(T, D, requires_grad=True)
    gate = torch.rand(E, C, requires_grad=True) if with_gate else None
    torch.library.opcheck(local_fixed_experts, (x, idx, gate, experts.w_in_EDF, experts.w_out_EHD))

    def grads(fn):
        for t in (x, gate, *experts.parameters()):
            if t is not None:
                t.grad = None
        out = fn()
        out.square().sum().backward()
        return [out.detach()] + [t.grad.clone() for t in (x, gate, *experts.parameters()) if t is not None]

    fused = grads(lambda: experts.forward_local(x, idx, gate))
    plain = grads(lambda: x.new_zeros(x.shape).index_add(
        0, idx.reshape(-1), experts.forward_fixed(x[idx.reshape(-1)].view(E, C, D), gate).reshape(-1, D)))
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
