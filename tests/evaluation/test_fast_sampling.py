"""Fast sampling: confidence-threshold decoding, prefix and dual block caches, early stop.

Golden tokens of the sampler before these options (tests/assets/sampling_golden.json, written by
the code at the commit it names) pin `--decoding fixed --cache none`; the cache is checked against
uncached forwards; threshold decoding's extremes by hand-set logits; accuracy on a model trained
here on the retrofit demonstration's copy task (benchmarks/sampling_tasks.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import evaluation.sample as sample
from benchmarks.sampling_tasks import EOD, exact_match, make_examples, train
from evaluation.sample import SampleConfig, generate, left_pad
from model import DiffusionTransformer, ModelConfig, from_dict
from model.kv_cache import BlockKVCache
from tests.evaluation.conftest import FixedLogits, tiny_config, tiny_model
from tests.evaluation.test_sample import PROMPTS, peaked_table

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "sampling_golden.json"
ROUTERS = ["expert_choice", "token_choice", "dense"]


@pytest.mark.parametrize("case", json.loads(GOLDEN.read_text())["cases"],
                         ids=lambda c: f"{c['router']}-{c['config']}")
def test_fixed_without_cache_gives_the_old_samplers_tokens(case):
    """Greedy, seeded sampling and guidance, EC (linear_reverse), TC and dense, left-padded."""
    model = tiny_model(case["router"], init_std=0.3)
    out = generate(model, json.loads(GOLDEN.read_text())["prompts"],
                   SampleConfig(**case["config"], decoding="fixed", cache="none"))
    assert out.tokens_BL.tolist() == case["tokens"]
    assert out.commit_step_BL.tolist() == case["commit_step"]
    assert out.forward_passes == case["forward_passes"]


def padded_canvas(L: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, 32, (3, L), generator=g)
    valid = torch.ones(3, L, dtype=torch.bool)
    valid[0, :3], valid[1, :1] = False, False     # left padding
    x[~valid] = 0
    x[:, 10:] = torch.where(torch.rand(3, L - 10, generator=g) < 0.6, 3, x[:, 10:])   # partly masked
    return x, valid, torch.tensor([0.4, 0.5, 0.7])


@pytest.mark.parametrize("router", ROUTERS)
def test_recording_forward_is_the_uncached_forward(router):
    model = tiny_model(router, init_std=0.3)
    x, valid, r = padded_canvas()
    cache = BlockKVCache()
    assert torch.allclose(model(x, r, valid, cache=cache).logits, model(x, r, valid).logits, atol=1e-5, rtol=0)
    assert len(cache.k) == model.cfg.model.n_layers


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("span", [(10, 14), (10, 20)])   # dual (a block), prefix (block and suffix)
def test_span_forward_on_a_fresh_record_equals_the_uncached_forward(router, span):
    """At a block's first step nothing cached is stale yet: the span's logits from cached keys and
    values equal the full forward's (RoPE offsets, key padding, the splice). EC with k = E, where
    every expert takes every token, so its routing cannot depend on which positions compete."""
    moe = {"router": router, "num_experts": 4, "expert_hidden": 16, "k": 4 if router == "expert_choice" else 2}
    cfg = from_dict(ModelConfig, {"model": {"vocab_size": 32, "d_model": 32, "n_layers": 2, "n_heads": 2,
                                            "max_seq_len": 32}, "moe": moe})
    model = DiffusionTransformer(cfg, seed=0).eval()
    for p in model.parameters():
        p.data.mul_(15.0) if p.dim() > 1 else None   # larger weights: differences would show
    x, valid, r = padded_canvas()
    rows = torch.zeros_like(valid)
    rows[:, span[0]:span[1]] = True
    with torch.no_grad():
        full = model(x, r, valid, logits_mask_BL=rows).logits
        cache = BlockKVCache()
        model(x, r, valid, cache=cache)
        cache.span = span
        cached = model(x, r, valid, logits_mask_BL=rows, cache=cache).logits
    assert full.shape == cached.shape
    assert torch.allclose(cached, full, atol=1e-5, rtol=0), (cached - full).abs().max()


@pytest.mark.parametrize("router", ROUTERS)
def test_span_forward_uses_the_spans_fresh_keys_after_its_tokens_change(router):
    """One layer: the keys and values of a column depend on its own token only, so after tokens
    inside the span change, the record outside it is still exact and the span forward must equal
    the uncached forward on the new canvas; it can only if the span's keys and values are fresh."""
    moe = {"router": router, "num_experts": 4, "expert_hidden": 16, "k": 4 if router == "expert_choice" else 2}
    cfg = from_dict(ModelConfig, {"model": {"vocab_size": 32, "d_model": 32, "n_layers": 1, "n_heads": 2,
                                            "max_seq_len": 32}, "moe": moe})
    model = DiffusionTransformer(cfg, seed=0).eval()
    for p in model.parameters():
        p.data.mul_(15.0) if p.dim() > 1 else None
    x, valid, r = padded_canvas()
    span = (10, 16)
    rows = torch.zeros_like(valid)
    rows[:, span[0]:span[1]] = True
    with torch.no_grad():
        cache = BlockKVCache()
        model(x, r, valid, cache=cache)
        x2 = x.clone()
        x2[:, 10:13] = torch.tensor([7, 8, 9])    # commits inside the span
        cache.span = span
        cached = model(x2, r, valid, logits_mask_BL=rows, cache=cache).logits
        full = model(x2, r, valid, logits_mask_BL=rows).logits
        stale = model(x, r, valid, logits_mask_BL=rows).logits
    assert not torch.allclose(full, stale, atol=1e-3)
    assert torch.allclose(cached, full, atol=1e-5, rtol=0), (cached - full).abs().max()


class Recorder:
    """Forward hook: every call's inputs, cache state and logits."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        cache = kwargs.get("cache")
        self.calls.append({"args": [a.clone() if torch.is_tensor(a) else a for a in args],
                           "rows": kwargs.get("logits_mask_BL").clone(), "cache": cache,
                           "recording": cache is not None and cache.recording, "logits": output.logits.clone()})


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_each_blocks_first_step_uses_exact_logits_and_a_fresh_record(router, cache):
    """In the sampler: at every block's first step the forward records a new cache and its
    logits are the uncached forward's on the same canvas (EC with its linear_reverse schedule,
    left padding); the other steps reuse that block's record."""
    model = tiny_model(router, init_std=0.3)
    rec = Recorder(model)
    generate(model, PROMPTS, SampleConfig(gen_length=12, steps=6, block_length=4, decoding="fixed", cache=cache))
    rec.handle.remove()
    firsts = [c for c in rec.calls if c["recording"]]
    assert len(firsts) == 3 and len({id(c["cache"]) for c in firsts}) == 3    # one new record per block
    assert [c["recording"] for c in rec.calls] == [True, False] * 3
    for c in firsts:
        x, r, valid = c["args"]
        plain = model(x, r, valid, logits_mask_BL=c["rows"]).logits
        assert torch.allclose(c["logits"], plain, atol=1e-5, rtol=0)
    for i, c in enumerate(rec.calls):
        if not c["recording"]:   # spans: dual the block, prefix the block and all after it
            start = 5 + 4 * (i // 2)
            assert c["cache"].span == ((start, start + 4) if cache == "dual" else (start, 17))


@pytest.mark.parametrize("router", ROUTERS)
def test_a_stale_cache_changes_the_tokens(router, monkeypatch):
    """The record must be rebuilt at each block boundary: keeping the first block's record for
    the whole generation (the bug this guards against) gives other tokens."""
    model = tiny_model(router, init_std=0.5)
    sc = SampleConfig(gen_length=12, steps=12, block_length=4, cache="dual")
    fresh = generate(model, PROMPTS, sc)
    real = sample.cache_for_step

    def stale(sc, cache, first_step, start, end, L):
        return real(sc, cache, first_step and cache is None, start, end, L)
    monkeypatch.setattr(sample, "cache_for_step", stale)
    assert not torch.equal(generate(model, PROMPTS, sc).tokens_BL, fresh.tokens_BL)


def test_threshold_above_every_confidence_commits_one_token_per_step():
    cfg = tiny_config("dense", vocab=16)
    P, G = 3, 8
    heights = {P + i: 1.0 + 0.5 * i for i in range(G)}       # confidences well below 1
    model = FixedLogits(peaked_table(P + G, 16, heights), cfg)
    out = generate(model, [[5, 6, 7], [8, 9, 10]], SampleConfig(gen_length=G, steps=G, block_length=4,
                                                                  decoding="threshold", threshold=1.0))
    assert out.forward_passes == G
    for row in out.commit_step_BL[:, P:].tolist():
        assert sorted(row) == list(range(G))                 # one per step, every step
    # the most confident first, as fixed decoding with one token per step does
    fixed = generate(model, [[5, 6, 7], [8, 9, 10]], SampleConfig(gen_length=G, steps=G, block_length=4))
    assert torch.equal(out.commit_step_BL, fixed.commit_step_BL) and torch.equal(out.tokens_BL, fixed.tokens_BL)


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_threshold_zero_commits_each_block_in_one_step(cache):
    model = tiny_model("expert_choice", init_std=0.3)
    out = generate(model, PROMPTS, SampleConfig(gen_length=12, steps=12, block_length=4, decoding="threshold",
                                                threshold=0.0, cache=cache))
    assert out.forward_passes == 3
    steps = out.commit_step_BL[:, 5:].view(3, 3, 4)
    assert (steps == torch.arange(3)[None, :, None]).all()


def test_threshold_steps_follow_the_confidence():
    """Positions above tau go together; a row's best goes even when below tau."""
    cfg = tiny_config("dense", vocab=16)
    P, G = 3, 6
    heights = {P + 0: 12.0, P + 1: 0.5, P + 2: 12.0, P + 3: 1.0, P + 4: 0.2, P + 5: 11.0}
    model = FixedLogits(peaked_table(P + G, 16, heights), cfg)
    out = generate(model, [[5, 6, 7]], SampleConfig(gen_length=G, steps=G, decoding="threshold", threshold=0.9))
    # step 0: the three confident ones; then one per step by confidence (1.0, 0.5, 0.2)
    assert out.commit_step_BL[0, P:].tolist() == [0, 2, 0, 1, 3, 0] and out.forward_passes == 4


def test_early_stop_ends_when_every_row_has_ended():
    """Columns 5 on prefer end-of-text (id 1): rows of different prompt lengths both end, nothing
    masked before; the rest of the canvas is filled with end-of-text, uncommitted."""
    cfg = tiny_config("dense", vocab=16)
    table = torch.zeros(24, 16)
    table[:, 7] = 5.0
    table[8:, 1] = 9.0
    model = FixedLogits(table, cfg)
    sc = SampleConfig(gen_length=16, steps=16, block_length=4, eod_id=1)
    out = generate(model, [[5, 6, 7, 8], [9, 10]], sc)
    full = generate(model, [[5, 6, 7, 8], [9, 10]], SampleConfig(gen_length=16, steps=16, block_length=4))
    assert out.forward_passes < full.forward_passes
    assert out.generated_BG.tolist() == full.generated_BG.tolist()   # here the rest is eod anyway
    assert (out.commit_step_BL[:, out.gen_start:] == -1).any() and out.tokens_committed < full.tokens_committed


def test_early_stop_waits_for_masks_before_the_end():
    """End-of-text committed first, at the far right of a one-block generation: the positions
    before it are still masked, so generation goes on until they are filled."""
    cfg = tiny_config("dense", vocab=16)
    table = torch.zeros(12, 16)
    table[:, 7] = 2.0
    table[11, 1] = 20.0
    model = FixedLogits(table, cfg)
    out = generate(model, [[5, 6, 7, 8]], SampleConfig(gen_length=8, steps=8, eod_id=1))
    assert out.forward_passes == 8 and out.generated_BG[0].tolist() == [7] * 7 + [1]


def test_options_are_checked_by_name():
    model = tiny_model("dense")
    for bad, match in ((dict(decoding="greedy"), "decoding='greedy' must be one of fixed, threshold"),
                       (dict(cache="kv"), "cache='kv' must be one of none, prefix, dual"),
                       (dict(decoding="threshold", threshold=1.5), r"threshold=1.5 must be in \[0, 1\]"),
                       (dict(decoding="threshold", remasking="random"), "needs remasking=low_confidence")):
        with pytest.raises(ValueError, match=match):
            generate(model, PROMPTS, SampleConfig(gen_length=8, steps=8, **bad))


# ---- a model trained here ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def copy_model():
    """EC linear_reverse, trained on the copy task ([COPY d1..d5 =] -> [d1..d5 EOD]); chance 1e-5."""
    return train("ec_linear_reverse", make_examples("copy", 2000, seed=0), gen_length=16, steps=300)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_threshold_and_cache_keep_exact_match_on_a_trained_model(copy_model, cache):
    held = make_examples("copy", 50, seed=1)
    prompts = [e.prompt for e in held]
    plain = generate(copy_model, prompts, SampleConfig(gen_length=16, steps=16))
    fast = generate(copy_model, prompts, SampleConfig(gen_length=16, steps=16, block_length=8, decoding="threshold",
                                                      threshold=0.9, cache=cache, eod_id=EOD))
    em_plain, em_fast = exact_match(plain.generated_BG, held), exact_match(fast.generated_BG, held)
    assert em_plain >= 0.8, em_plain                       # far above chance
    assert em_fast >= em_plain - 0.02, (em_fast, em_plain)
    assert fast.forward_passes <= plain.forward_passes // 4, fast.forward_passes


def test_early_stop_never_changes_the_text_before_end_of_text(copy_model):
    held = make_examples("copy", 20, seed=2)
    prompts = [e.prompt for e in held]
    sc = dict(gen_length=16, steps=16, block_length=4)
    full = generate(copy_model, prompts, SampleConfig(**sc))
    early = generate(copy_model, prompts, SampleConfig(**sc, eod_id=EOD))
    assert early.forward_passes < full.forward_passes
    for a, b in zip(early.generated_BG.tolist(), full.generated_BG.tolist()):
        assert a[:a.index(EOD) + 1] == b[:b.index(EOD) + 1]


# ---- expert parallelism: ranks with different prompts agree on every step ------------------------
EP_CASES = (("expert_choice", "static", "dual"), ("expert_choice", "linear_reverse", "prefix"),
            ("token_choice", "static", "dual"))
RANK_PROMPTS = ([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]], [[20, 21, 22, 23, 24], [7, 7, 7, 7, 7]])


def ep_sample_config(cache: str, eod: int) -> SampleConfig:
    return SampleConfig(gen_length=12, steps=12, block_length=4, decoding="threshold", threshold=0.5,
                        cache=cache, eod_id=eod)


def _ep_generate(rank, world, states, eods):
    import torch.distributed as dist
    torch.set_num_threads(1)
    out = []
    for (router, capacity, cache), state, eod in zip(EP_CASES, states, eods):
        model = DiffusionTransformer(tiny_config(router, capacity=capacity, ep_size=2), dist.group.WORLD).eval()
        El = model.cfg.moe.num_experts // 2
        model.load_state_dict({k: (v[rank * El:(rank + 1) * El] if ".experts." in k else v) for k, v in state.items()})
        gen = generate(model, RANK_PROMPTS[rank], ep_sample_config(cache, eod))
        out.append((gen.tokens_BL, gen.forward_passes))
    return out


def test_expert_parallel_ranks_with_different_prompts_agree_on_steps():
    """Two ranks, experts split over them (ep=2), each with its own prompts: threshold decoding
    needs a different number of steps per block on each, and early stop comes at a different
    step; every forward is an all-to-all, so the ranks must take the same steps (any_rank). Each
    rank's tokens equal one process's on its own prompts; the forward counts are equal."""
    from tests.distributed import run_distributed
    states, eods, alone = [], [], []
    for router, capacity, cache in EP_CASES:
        model = tiny_model(router, capacity=capacity, init_std=0.3)
        first = generate(model, RANK_PROMPTS[0], ep_sample_config(cache, None))
        eod = int(torch.mode(first.generated_BG[0]).values)   # a token rank 0 commits early on
        runs = [generate(model, p, ep_sample_config(cache, eod)) for p in RANK_PROMPTS]
        states.append(model.state_dict())
        eods.append(eod)
        alone.append(runs)
    both = run_distributed(_ep_generate, 2, states, eods)
    differed = False
    for i, runs in enumerate(alone):
        differed |= runs[0].forward_passes != runs[1].forward_passes
        for rank in (0, 1):
            tokens, calls = both[rank][i]
            assert torch.equal(tokens, runs[rank].tokens_BL), (EP_CASES[i], rank)
            assert calls == max(r.forward_passes for r in runs)   # the slower rank's count, on both
    assert differed   # the case this test is for: alone, the ranks would take different steps
