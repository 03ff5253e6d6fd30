"""Multiple choice on a constructed task a tiny model was trained on: far above chance in both modes,
the same under two gloo ranks as on one, and the on-the-fly `evaluate_tasks` entry point."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from model import DiffusionTransformer, forward_loss
from tests.distributed import run_distributed
from tests.evaluation.conftest import tiny_config
from evaluation.sample import left_pad
from evaluation.multiple_choice import (MCItem, continuation, evaluate_mc, label_token_ids, load_mc_jsonl,
                                        single_mask_prompt)
from evaluation.tasks import evaluate_tasks

ATTRS = ["red", "blue", "green", "gold", "grey", "pink", "black", "white"]
N_ITEMS = 24


class WordTokenizer:
    """Whitespace word-level tokenizer over a fixed vocabulary, ids 0..3 special like the real one."""
    pad_id, eod_id, mask_id = 0, 2, 3

    def __init__(self, words):
        self.words = ["<pad>", "<unk>", "<eod>", "<mask>"] + sorted(set(words))
        self.ids = {w: i for i, w in enumerate(self.words)}

    def encode(self, text: str) -> list:
        return [self.ids.get(w, 1) for w in text.split()]

    def decode(self, ids) -> str:
        return " ".join(self.words[i] for i in ids)


def make_task(seed: int = 0) -> list:
    rng = random.Random(seed)
    items = []
    for i in range(N_ITEMS):
        right = rng.choice(ATTRS)
        choices = [right] + rng.sample([a for a in ATTRS if a != right], 3)
        rng.shuffle(choices)
        items.append(MCItem(f"the colour of thing{i} is", choices, choices.index(right)))
    return items


def tokenizer_for(items) -> WordTokenizer:
    words = ATTRS + list("ABCD") + ["A.", "B.", "C.", "D.", "Answer:"]
    for it in items:
        words += it.prompt.split()
    return WordTokenizer(words)


def training_rows(items, tok) -> list:
    """(prompt ids, answer ids) in both evaluation formats: the task's answers are the training data."""
    labels = label_token_ids(tok, 4)
    rows = []
    for it in items:
        right = it.choices[it.answer]
        rows.append((tok.encode(it.prompt), tok.encode(continuation(it.prompt, right))))
        rows.append((tok.encode(single_mask_prompt(it)), [labels[it.answer]]))
    return rows


def train_tiny(items, tok, steps: int = 150, seed: int = 0, vocab: int = None,
               max_seq_len: int = 32) -> DiffusionTransformer:
    cfg = tiny_config("expert_choice", vocab=vocab or len(tok.words), max_seq_len=max_seq_len)
    # trained on prompted rows, as SFT is: the mask ratio counts the answer (and so does inference)
    cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, mask_ratio_over="response"))
    model = DiffusionTransformer(cfg, seed=seed)
    rows = training_rows(items, tok)
    L = max(len(p) + len(a) for p, a in rows)
    tokens = torch.zeros(len(rows), L, dtype=torch.long)
    prompt = torch.zeros(len(rows), L, dtype=torch.bool)
    valid = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, (p, a) in enumerate(rows):
        tokens[b, :len(p) + len(a)] = torch.tensor(p + a)
        prompt[b, :len(p)] = True
        valid[b, :len(p) + len(a)] = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        loss = forward_loss(model, tokens, torch.rand(len(rows), generator=g, dtype=torch.float64),
                            torch.rand(tokens.shape, generator=g), valid, prompt).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    items = make_task()
    tok = tokenizer_for(items)
    return train_tiny(items, tok), tok, items


@pytest.fixture(scope="session")
def colour_run(tmp_path_factory):
    """A run directory the command-line tools load (also test_lm_eval_adapter's), of a tiny model
    trained to solve the colour task above (chance 0.25), with a real sentencepiece tokenizer
    trained on its text (vocab 400: every word one piece, so the prompts stay short) and a
    safetensors checkpoint. Returns {"checkpoint", "task" (JSON lines), "items", "model", "tokenizer"}."""
    import yaml
    from safetensors.torch import save_file

    from evaluation.hf.ecdlm_format import sections
    from rundir.tokenizer import Tokenizer
    from evaluation.multiple_choice import continuation, single_mask_prompt
    from rundir.checkpoints import file_digest, tag_for, write_manifest
    from trainer.data.tokenizer import load_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("colour_run")
    items = make_task()
    texts = [single_mask_prompt(it) + " " + "ABCD"[it.answer] for it in items]
    texts += [it.prompt + continuation(it.prompt, c) for it in items for c in it.choices]
    blob = train_tokenizer(texts * 4, 400, "bpe", 1)
    (root / "data").mkdir()
    (root / "data" / "tokenizer.model").write_bytes(blob)
    sp, info = load_tokenizer(blob)
    tok = Tokenizer(sp, info.pad_id, info.eod_id, info.mask_id, info.vocab_size)
    model = train_tiny(items, tok, vocab=info.vocab_size, max_seq_len=96)
    run = {**sections(model.cfg), "train": {"run_name": "colours", "output_dir": str(root), "seq_len": 96},
           "data": {"path": str(root / "data")}}
    (root / "config.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    ckpt = root / "checkpoints" / tag_for(150)
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    # a real manifest: every reader verifies it (issue 20)
    write_manifest(str(ckpt), 150, {"model.safetensors": file_digest(str(ckpt / "model.safetensors"))}, healthy=True)
    task = root / "colours.jsonl"
    task.write_text("".join(json.dumps({"question": it.prompt, "choices": it.choices, "answer": it.answer}) + "\n"
                            for it in items))
    return {"checkpoint": ckpt, "task": task, "items": items, "model": model, "tokenizer": tok}


def test_untrained_model_is_near_chance():
    items = make_task()
    tok = tokenizer_for(items)
    model = DiffusionTransformer(tiny_config("expert_choice", vocab=len(tok.words)), seed=0).eval()
    assert evaluate_mc(model, tok, items, "single_mask")["acc"] < 0.6


@pytest.mark.parametrize("mode", ["likelihood", "single_mask"])
def test_trained_model_is_far_above_chance(trained, mode):
    model, tok, items = trained
    res = evaluate_mc(model, tok, items, mode, mc_num=8, batch_size=8)
    assert res["n"] == N_ITEMS and res["acc"] >= 0.8, res   # chance is 0.25
    if mode == "likelihood":
        assert 0.0 <= res["acc_norm"] <= 1.0


def _eval_on_ranks(rank, world, state, vocab, items, words):
    torch.set_num_threads(1)
    model = DiffusionTransformer(tiny_config("expert_choice", vocab=vocab, max_seq_len=32))
    model.load_state_dict(state)
    tok = WordTokenizer(words[4:])
    return {mode: evaluate_mc(model.eval(), tok, items, mode, mc_num=4, batch_size=4)
            for mode in ("likelihood", "single_mask")}


def test_two_ranks_give_the_one_rank_result(trained):
    model, tok, items = trained
    items = items[:7]   # uneven split: one rank repeats a question and discards it
    one = {mode: evaluate_mc(model, tok, items, mode, mc_num=4, batch_size=4, rank=0, world=1)
           for mode in ("likelihood", "single_mask")}
    both = run_distributed(_eval_on_ranks, 2, model.state_dict(), len(tok.words), items, tok.words)
    assert both[0] == both[1] == one


def test_evaluate_tasks_runs_due_tasks_and_names_metrics(trained, tmp_path):
    model, tok, items = trained
    path = tmp_path / "colours.jsonl"
    path.write_text("".join(json.dumps({"question": it.prompt, "choices": it.choices, "answer": it.answer}) + "\n"
                            for it in items))
    tasks = [{"name": "colours", "path": str(path), "mode": "single_mask", "every": 10},
             {"name": "colours_ll", "path": str(path), "mode": "likelihood", "every": 20, "mc_num": 4, "limit": 8}]
    model.train()
    assert evaluate_tasks(model, tasks, tok, step=5) == {}
    assert set(evaluate_tasks(model, tasks, tok, step=10)) == {"eval/colours/acc"}
    row = evaluate_tasks(model, tasks, tok, step=20)
    assert set(row) == {"eval/colours/acc", "eval/colours_ll/acc", "eval/colours_ll/acc_norm"}
    assert row["eval/colours/acc"] >= 0.8
    assert model.training   # the caller's mode is restored


def test_bad_task_lines_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n" +
                    json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'answer'"):
        load_mc_jsonl(str(path))


def test_left_padding_helper_aligns_prompts_right():
    x, v = left_pad([[7, 8, 9], [5]], 0)
    assert x.tolist() == [[7, 8, 9], [0, 0, 5]] and v.tolist() == [[True] * 3, [False, False, True]]


def test_task_specs_are_checked_before_training(tmp_path):
    from model.config import ConfigError
    from evaluation.tasks import check_tasks
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1}) + "\n")
    check_tasks([{"name": "t", "path": str(path), "mode": "likelihood", "every": 100, "mc_num": 8}])
    for bad, field in (({"name": "t", "path": str(path), "mode": "greedy"}, r"eval.tasks\[0\].mode"),
                       ({"name": "t", "path": str(tmp_path / "nope.jsonl")}, r"eval.tasks\[0\].path"),
                       ({"name": "t", "path": str(path), "every": 0}, r"eval.tasks\[0\].every"),
                       ({"name": "t", "path": str(path), "evry": 5}, r"eval.tasks\[0\].evry")):
        with pytest.raises(ConfigError, match=field):
            check_tasks([bad])


def test_command_line_on_a_real_run(two_runs, tmp_path):
    import os
    import subprocess
    import sys
    from tests.trainer.launch import ROOT
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (
        {"question": "import os\nimport", "choices": ["sys", "zzz"], "answer": 0},
        {"context": "def f(x):", "question": "    return", "choices": ["x", "(", "]]]"], "answer": 0})))
    for mode in ("likelihood", "single_mask"):
        proc = subprocess.run([sys.executable, "-m", "evaluation.multiple_choice", str(two_runs["ec"]), "--task", str(path),
                               "--mode", mode, "--mc-num", "4", "--json"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        res = json.loads(proc.stdout)
        assert res["n"] == 2 and res["mode"] == mode and 0.0 <= res["acc"] <= 1.0


@pytest.mark.parametrize("mode", ["likelihood", "single_mask"])
def test_command_line_solves_a_task_the_model_was_trained_on(colour_run, mode):
    """The CLI on a checkpoint of a model trained on the colour task (sentencepiece tokenizer,
    safetensors checkpoint): far above chance (0.25), and the same numbers as evaluate_mc on the
    model in memory, so loading changed nothing."""
    import os
    import subprocess
    import sys
    from tests.trainer.launch import ROOT
    proc = subprocess.run([sys.executable, "-m", "evaluation.multiple_choice", str(colour_run["checkpoint"]),
                           "--task", str(colour_run["task"]), "--mode", mode, "--mc-num", "8", "--batch-size", "8",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["n"] == N_ITEMS and res["mode"] == mode
    assert res["acc"] >= 0.7, res
    here = evaluate_mc(colour_run["model"], colour_run["tokenizer"], colour_run["items"], mode, mc_num=8, batch_size=8)
    assert {k: res[k] for k in here} == here


def _eval_expert_parallel(rank, world, state, vocab, capacity, items, words):
    """Experts split over the two ranks (ep=2), each rank with its own questions."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    cfg = tiny_config("expert_choice", vocab=vocab, max_seq_len=32, capacity=capacity, ep_size=2)
    model = DiffusionTransformer(cfg, dist.group.WORLD)
    El = cfg.moe.num_experts // 2
    model.load_state_dict({k: (v[rank * El:(rank + 1) * El] if ".experts." in k else v) for k, v in state.items()})
    tok = WordTokenizer(words[4:])
    return {mode: evaluate_mc(model.eval(), tok, items, mode, mc_num=4, batch_size=3)
            for mode in ("likelihood", "single_mask")}


@pytest.mark.parametrize("capacity", ["static", "linear_reverse"])
def test_expert_parallel_ranks_give_the_one_process_result(trained, capacity):
    """ep=2: the ranks hold different experts and get questions of different lengths; fixed
    shapes keep their all-to-alls in step (static capacity, whose sizes follow from shapes alone,
    included)."""
    model, tok, items = trained
    items = items[:7] + [MCItem("a much longer question about thing3 that is", items[3].choices, items[3].answer)]
    one_model = DiffusionTransformer(tiny_config("expert_choice", vocab=len(tok.words), capacity=capacity)).eval()
    one_model.load_state_dict(model.state_dict())   # same weights, this capacity schedule
    one = {mode: evaluate_mc(one_model, tok, items, mode, mc_num=4, batch_size=3, rank=0, world=1)
           for mode in ("likelihood", "single_mask")}
    both = run_distributed(_eval_expert_parallel, 2, model.state_dict(), len(tok.words), capacity, items, tok.words)
    assert both[0] == both[1] == one
