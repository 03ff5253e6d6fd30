"""The sampler: invariants on real tiny models, and its decisions checked on a stand-in model whose
logits are set by hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.evaluation.conftest import FixedLogits, tiny_config, tiny_model
from tests.trainer.launch import ROOT
from evaluation.sample import SampleConfig, commit_counts, generate, left_pad

MASK = 3
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


def peaked_table(L: int, V: int, peak: dict) -> torch.Tensor:
    """[L, V] logits: position p puts logit peak[p] on token (p % (V - 4)) + 4, zero elsewhere."""
    table = torch.zeros(L, V)
    for p, height in peak.items():
        table[p, (p % (V - 4)) + 4] = height
    return table


@pytest.mark.parametrize("router", ["expert_choice", "token_choice", "dense"])
@pytest.mark.parametrize("sc", [SampleConfig(gen_length=12, steps=12), SampleConfig(gen_length=12, steps=6, block_length=4), SampleConfig(gen_length=12, steps=3, block_length=4, temperature=1.0, remasking="random"),
                                SampleConfig(gen_length=12, steps=6, block_length=6, temperature=0.7, remasking="low_confidence", cfg_scale=1.5)])
def test_fills_every_mask_and_keeps_the_prompt(router, sc):
    model = tiny_model(router)
    out = generate(model, PROMPTS, sc)
    padded, valid = left_pad(PROMPTS, model.cfg.model.pad_id)
    assert not (out.generated_BG == MASK).any()
    assert torch.equal(out.tokens_BL[:, :out.gen_start], padded)
    assert torch.equal(out.valid_BL[:, :out.gen_start], valid)
    assert (out.commit_step_BL[:, out.gen_start:] >= 0).all() and (out.commit_step_BL[:, :out.gen_start] == -1).all()
    assert out.forward_passes == sc.steps


def test_temperature_zero_is_deterministic():
    model = tiny_model("expert_choice", init_std=0.3)
    a = generate(model, PROMPTS, SampleConfig(gen_length=12, steps=6, block_length=4, temperature=0.0), torch.Generator().manual_seed(1))
    b = generate(model, PROMPTS, SampleConfig(gen_length=12, steps=6, block_length=4, temperature=0.0), torch.Generator().manual_seed(2))
    assert torch.equal(a.tokens_BL, b.tokens_BL) and torch.equal(a.commit_step_BL, b.commit_step_BL)
    # sampling is reproducible from the seed, and does depend on it
    s1 = generate(model, PROMPTS, SampleConfig(gen_length=12, steps=6, block_length=4, temperature=1.0), torch.Generator().manual_seed(1))
    s1b = generate(model, PROMPTS, SampleConfig(gen_length=12, steps=6, block_length=4, temperature=1.0), torch.Generator().manual_seed(1))
    s2 = generate(model, PROMPTS, SampleConfig(gen_length=12, steps=6, block_length=4, temperature=1.0), torch.Generator().manual_seed(2))
    assert torch.equal(s1.tokens_BL, s1b.tokens_BL) and not torch.equal(s1.tokens_BL, s2.tokens_BL)


def test_low_confidence_commits_the_most_confident_position_first():
    cfg = tiny_config("dense", vocab=16)
    P, G = 3, 6
    heights = {P + 0: 2.0, P + 1: 6.0, P + 2: 1.0, P + 3: 4.0, P + 4: 3.0, P + 5: 5.0}
    model = FixedLogits(peaked_table(P + G, 16, heights), cfg)
    out = generate(model, [[5, 6, 7]], SampleConfig(gen_length=G, steps=G))   # one commit per step
    order = sorted(heights, key=heights.get, reverse=True)    # most confident first
    assert [int(out.commit_step_BL[0, p]) for p in order] == list(range(G))
    for p in heights:   # and each commits its argmax token
        assert int(out.tokens_BL[0, p]) == (p % 12) + 4


def test_random_remasking_ignores_confidence():
    cfg = tiny_config("dense", vocab=16)
    heights = {3 + i: float(10 * (i + 1)) for i in range(8)}
    model = FixedLogits(peaked_table(11, 16, heights), cfg)
    orders = {tuple(generate(model, [[5, 6, 7]], SampleConfig(gen_length=8, steps=8, block_length=None, temperature=0.0, remasking="random", seed=s))
                    .commit_step_BL[0, 3:].tolist()) for s in range(4)}
    assert len(orders) > 1   # not the confidence order every time: the order is random


def test_blocks_are_filled_left_to_right():
    cfg = tiny_config("dense", vocab=16)
    P, G, block = 2, 12, 4
    # the last block is the most confident, so only the block order can make it go last
    heights = {P + i: float(1 + i) for i in range(G)}
    model = FixedLogits(peaked_table(P + G, 16, heights), cfg)
    out = generate(model, [[5, 6]], SampleConfig(gen_length=G, steps=6, block_length=block))   # 2 steps per block, 2 tokens per step
    steps = out.commit_step_BL[0, P:].view(3, block)
    for b in range(3):
        assert sorted(steps[b].tolist()) == [2 * b, 2 * b, 2 * b + 1, 2 * b + 1]
    # within a block the most confident (rightmost) go first
    assert steps[0].tolist() == [1, 1, 0, 0]


def test_forward_gets_the_current_mask_ratio():
    cfg = tiny_config("dense", vocab=16)
    model = FixedLogits(peaked_table(12, 16, {}), cfg)
    generate(model, [[5, 6, 7, 8]], SampleConfig(gen_length=8, steps=4))   # 2 tokens per step
    # r is masked / whole sequence (prompt of 4 included), as pretraining defines it
    assert [round(float(c["ratio"][0]), 4) for c in model.calls] == [round(x / 12, 4) for x in (8, 6, 4, 2)]


def test_guidance_masks_the_prompt_in_the_unconditional_branch():
    cfg = tiny_config("dense", vocab=16)
    model = FixedLogits(peaked_table(12, 16, {}), cfg)
    generate(model, [[5, 6, 7, 8]], SampleConfig(gen_length=8, steps=4, block_length=None, temperature=0.0, remasking="low_confidence", cfg_scale=2.0))
    first = model.calls[0]
    assert first["tokens"].shape[0] == 2   # conditional and unconditional rows in one forward
    assert first["tokens"][0, :4].tolist() == [5, 6, 7, 8] and (first["tokens"][1] == MASK).all()
    assert first["ratio"].tolist() == pytest.approx([8 / 12, 1.0])
    second = model.calls[1]   # 2 of 8 generated committed: cond r = 6/12, uncond (prompt masked) r = 10/12
    assert second["ratio"][0] == pytest.approx(0.5) and second["ratio"][1] == pytest.approx(10 / 12)


def test_commit_counts_split_the_block_evenly():
    left = torch.tensor([8])
    counts = []
    for s in range(3, 0, -1):
        k = commit_counts(left, s)
        counts.append(int(k))
        left = left - k
    assert counts == [3, 3, 2] and int(left) == 0


@pytest.mark.parametrize("router", ["expert_choice", "dense"])
def test_left_padding_does_not_change_a_prompt_s_result(router):
    model = tiny_model(router, init_std=0.3)
    alone = generate(model, [PROMPTS[1]], SampleConfig(gen_length=8, steps=8))
    batched = generate(model, PROMPTS, SampleConfig(gen_length=8, steps=8))
    assert torch.equal(alone.generated_BG[0], batched.generated_BG[1])


def test_invalid_settings_name_the_problem():
    model = tiny_model("dense")
    with pytest.raises(ValueError, match="block_length"):
        generate(model, PROMPTS, SampleConfig(gen_length=10, steps=10, block_length=4))
    with pytest.raises(ValueError, match="steps"):
        generate(model, PROMPTS, SampleConfig(gen_length=12, steps=5, block_length=4))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, PROMPTS, SampleConfig(gen_length=40, steps=40))


def test_command_line_on_a_real_run(two_runs, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "import os\nimport"}) + "\n" + "def main():\n")
    proc = subprocess.run([sys.executable, "-m", "evaluation.sample", str(two_runs["ec"]), "--prompt", "class Foo",
                           "--prompt-file", str(prompts), "--gen-length", "16", "--steps", "8", "--block-length", "8",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["class Foo", "import os\nimport", "def main():"]
    assert "8 forward passes" in proc.stderr and "tokens/s" in proc.stderr   # one batch of 3, 8 steps
    assert all(r["nfe"] == 8 and r["tokens_per_s"] > 0 for r in rows)
    # the documented fast settings (docs/sampling.md): threshold decoding, dual cache, early stop
    fast = subprocess.run([sys.executable, "-m", "evaluation.sample", str(two_runs["ec"]), "--prompt", "class Foo",
                           "--prompt-file", str(prompts), "--gen-length", "16", "--block-length", "8",
                           "--decoding", "threshold", "--threshold", "0.9", "--cache", "dual", "--early-stop", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert fast.returncode == 0, fast.stderr
    rows = [json.loads(line) for line in fast.stdout.splitlines()]
    assert len(rows) == 3 and all(2 <= r["nfe"] <= 16 and r["tokens_per_s"] > 0 for r in rows)
    bad = subprocess.run([sys.executable, "-m", "evaluation.sample", str(two_runs["ec"]), "--prompt", "x",
                          "--decoding", "threshold", "--threshold", "2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "threshold=2.0 must be in [0, 1]" in bad.stderr
