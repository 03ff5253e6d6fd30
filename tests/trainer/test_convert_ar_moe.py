"""Converting an imported autoregressive MoE into an expert-choice diffusion LM (issue 23), through
the real trainer: a tiny random Qwen3MoeForCausalLM (transformers' class, save_pretrained) is
imported by the CLI, and the imported run's own config.yaml trains with the conversion's overrides
(`init.from=RUN model.attention=bidirectional moe.router=expert_choice`) on 2 gloo ranks with the
experts split over both (ep=2), and resumes exactly; the converted run's ecdlm-format export loads
through transformers' remote code and gives ecdlm's logits."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.trainer.launch import ROOT, launch, per_step, tiny_overrides


def import_tiny_qwen3(tmp_path):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=16,
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=64, norm_topk_prob=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    Qwen3MoeForCausalLM(cfg).save_pretrained(str(tmp_path / "hf"))
    run = tmp_path / "qwen3"
    # the small corpus's ids: pad 0, <|mask|> 3 (a bare weight folder: the ids are named)
    proc = subprocess.run([sys.executable, "-m", "evaluation.hf", "import", str(tmp_path / "hf"), str(run),
                           "--mask-id", "3", "--pad-id", "0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return run


def convert(small_corpus, imported, run_dir, steps: int):
    over = tiny_overrides(small_corpus, run_dir, **{
        "init.from": str(imported), "model.attention": "bidirectional", "moe.router": "expert_choice",
        "moe.ep_size": 2, "train.max_steps": steps, "train.schedule_steps": 4, "train.seq_len": 64,
        "train.eval_every": 100, "train.save_every": 2, "optim.warmup_steps": 1})
    return launch(2, over, config=str(imported / "config.yaml"))


def test_converted_model_trains_under_expert_parallel_ec_resumes_exactly_and_exports(small_corpus, tmp_path):
    imported = import_tiny_qwen3(tmp_path)
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = convert(small_corpus, imported, straight, 4)
    text = proc.stdout + proc.stderr
    assert "tensors loaded (source router token_choice, configured expert_choice)" in text, text[-4000:]
    convert(small_corpus, imported, split, 2)
    assert (split / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    again = convert(small_corpus, imported, split, 4)
    assert "not used: resuming from the run's own checkpoint" in again.stdout + again.stderr
    a, b = per_step(straight, "train/loss"), per_step(split, "train/loss")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6), step

    # the converted run is bidirectional expert choice, and its export runs without ecdlm
    from evaluation.inference import mask_ratio
    from evaluation.loading import load_model_for_inference
    from tests.evaluation.test_hf import export_cli, masked_inputs, read_safetensors_file, run_without_repo
    from safetensors.torch import save_file
    model, cfg = load_model_for_inference(str(straight))
    assert (cfg.model.attention, cfg.moe.router, cfg.model.head_dim, cfg.model.qk_norm) == \
        ("bidirectional", "expert_choice", 16, "head")
    export_cli(straight, tmp_path / "export")
    inputs = masked_inputs(0)
    save_file(inputs, str(tmp_path / "in.safetensors"))
    with torch.no_grad():
        ref = model(inputs["ids"], mask_ratio(inputs["ids"], inputs["valid"], 3), inputs["valid"]).logits
    run_without_repo(tmp_path, [{"dir": str(tmp_path / "export"), "inputs": str(tmp_path / "in.safetensors"),
                                 "out": str(tmp_path / "out.safetensors")}])
    got = read_safetensors_file(tmp_path / "out.safetensors")["logits"]
    assert float((got - ref)[inputs["valid"]].abs().max()) < 1e-5
