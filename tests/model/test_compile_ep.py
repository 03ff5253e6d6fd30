"""torch.compile on the expert-parallel path, 2 gloo ranks: a block with EC static (slot path
and once-per-rank path) or TC with a capacity factor compiles whole (fullgraph=True, forward
and backward) through functional collectives, and matches the eager hand-written exchange."""
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from benchmarks.host_syncs import tiny_config
from model.transformer import Block, rope_tables
from tests.distributed import run_distributed
from tests.model.test_compile import block_grads

# T = 2 x 64 tokens per rank, 16 experts (8 per rank); C per expert in the comments
CASES = {"ec_static_slots": dict(router="expert_choice", k=1),    # C = 2 * 64k/16 = 8: El*C <= T, a row per slot
         "ec_static_tokens": dict(router="expert_choice", k=4),   # C = 32: El*C > T, each token once per rank
         "tc_cf1": dict(router="token_choice", capacity_factor=1.0, k=1)}   # C = ceil(128/16) = 8: slots
CAPACITY = {"ec_static_slots": 8, "ec_static_tokens": 32, "tc_cf1": 8}


def _compile_on_ranks(rank, world):
    out = {}
    for name, moe in CASES.items():
        cfg = tiny_config(**moe)
        torch.manual_seed(0)   # the same weights on both ranks, then each rank's experts
        block = Block(cfg, 1, ep_group=dist.group.WORLD)
        block.ffn.experts.init_weights(0, 1, 0.02, 0.02)
        torch.manual_seed(10 + rank)   # each rank its own tokens
        x, r = torch.randn(2, 64, cfg.model.d_model), torch.rand(2)
        rope = rope_tables(64, cfg.model.d_model // cfg.model.n_heads, 10000.0)
        path = block.ffn.dispatcher.sends_tokens_once([CAPACITY[name]] * world, 128)

        def step(x):
            o = block(x, rope, None, r, None)
            return o.hidden, o.loss
        torch._dynamo.reset()
        counters.clear()
        got = block_grads(torch.compile(step, fullgraph=True, backend="aot_eager"), block, x)
        want = block_grads(step, block, x)
        out[name] = dict(breaks=sum(counters["graph_break"].values()), graphs=counters["stats"]["unique_graphs"],
                         tokens_path=path,
                         err=max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-12)) for g, w in zip(got, want)))
    return out


def test_expert_parallel_block_compiles_whole_on_two_ranks():
    for rank, res in enumerate(run_distributed(_compile_on_ranks, 2)):
        assert res["ec_static_tokens"]["tokens_path"] and not res["ec_static_slots"]["tokens_path"], res
        for name, r in res.items():
            assert r["breaks"] == 0 and r["graphs"] == 1, (rank, name, r)
            assert r["err"] < 1e-4, (rank, name, r)
