"""The small-scale retrofit demonstration's test (issue 12): the shared 24-step token-choice run
(tc_run, tests/conftest.py) retrofitted to expert choice with the linear_reverse capacity schedule
and fine-tuned through the real trainer on benchmarks/retrofit_demo.py's task (the same writer),
then scored by greedy exact match on held-out strings, logged by the run and recomputed here from
its final checkpoint. (That every tensor but the dropped biases equals the TC run's at step 0 is
tests/trainer/test_init_from.py's test_tc_to_ec_keeps_every_tensor_but_the_tc_biases.)"""
from __future__ import annotations

import pytest
import torch

from benchmarks.retrofit.arms import arm_specs
from benchmarks.retrofit.task import chance_exact_match, prepare_task, write_task
from evaluation.generation_tasks import evaluate_generation, load_generation_jsonl
from evaluation.loading import load_run
from tests.evaluation.conftest import start_run
from tests.trainer.launch import per_step
from evaluation.task_config import EvalTaskConfig

SEQ_LEN, GEN = 16, 8   # "copy 12345 =" is 8 tokens; the answer, its space and end-of-text fill the rest
STEPS = 200


@pytest.fixture(scope="module")
def retrofit(tc_run, small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrofit")
    paths = write_task(str(root / "task"), n_train=1500, n_heldout=32)
    sft = prepare_task(paths["train"], str(root / "sft"), SEQ_LEN, str(small_corpus / "tokenizer.model"))
    task = f"[{{name: copy, path: {paths['heldout']}, mode: generate, every: {STEPS}, gen_length: {GEN}, batch_size: 32}}]"
    run_dir = root / "ec"
    p = start_run(sft, run_dir, **{**arm_specs(2, 3)["ec_linear_reverse"], "init.from": str(tc_run),
                                   "train.seq_len": SEQ_LEN, "train.max_steps": STEPS, "train.eval_every": STEPS,
                                   "train.global_batch_size": 32, "train.micro_batch_size": 32,
                                   "optim.warmup_steps": 10, "train.log_every": 20, "eval.tasks": task})
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-6000:]
    assert "dropped the token-choice expert biases of 4 layers" in out
    return run_dir, paths, sft


def test_retrofitted_ec_model_copies_held_out_strings(retrofit):
    run_dir, paths, sft = retrofit
    chance = chance_exact_match(5, 5)
    logged = per_step(run_dir, "eval/copy/exact_match")[STEPS]
    assert logged >= 0.5 > 1000 * chance, logged
    torch.set_num_threads(1)
    model, cfg, tok = load_run(str(run_dir), tokenizer_dir=sft)
    assert cfg.moe.router == "expert_choice" and cfg.moe.capacity.schedule == "linear_reverse"
    items = load_generation_jsonl(paths["heldout"])
    task = EvalTaskConfig(name="copy", path=paths["heldout"], mode="generate", gen_length=GEN, batch_size=32)
    assert evaluate_generation(model, tok, items, task)["exact_match"] == pytest.approx(logged)
