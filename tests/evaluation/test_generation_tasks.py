"""Generation tasks scored by exact match: extraction and scoring by hand, the config checks that
name the field, the real sampler on a model whose logits are set by hand and on a tiny model
trained on the colour task (tests/evaluation/test_multiple_choice.py), and two gloo ranks (data
and expert parallel) giving the one-process result."""
from __future__ import annotations

import json

import pytest
import torch

from model import DiffusionTransformer
from model.config import ConfigError
from evaluation.task_config import EvalTaskConfig
from evaluation.generation_tasks import (GenItem, completion_text, evaluate_generation, exact_match,
                                         extract_answer, load_generation_jsonl, prompt_ids, sample_config)
from evaluation.sample import generate
from evaluation.tasks import check_tasks, evaluate_tasks
from tests.distributed import run_distributed
from tests.evaluation.conftest import FixedLogits, tiny_config
from tests.evaluation.test_multiple_choice import WordTokenizer, make_task, tokenizer_for

GSM = r"#### (\-?[0-9.,]+)"


# ---- extraction and scoring, by hand ------------------------------------------------------------
def test_extraction_takes_the_first_match_and_its_group():
    assert extract_answer("so 3 + 4 = 7 #### 7 and #### 9", GSM) == "7"
    assert extract_answer("  forty two \n", None) == "forty two"
    assert extract_answer("no marker here", GSM) is None
    assert extract_answer("x = 12, y = 30", r"\d+") == "12"           # no group: the whole match
    assert extract_answer("ab", r"(z)?b") == ""                        # a group that took no part


def test_exact_match_reduces_both_sides_the_same_way():
    assert exact_match("Natalia sold 48 + 24 = 72 #### 72", "She sold 48/2 = 24 ... #### 72", GSM)
    assert exact_match("#### 72", "72", GSM)                 # a reference with no match counts whole
    assert not exact_match("72", "#### 72", GSM)             # a completion with no match is wrong
    assert not exact_match("#### 71", "#### 72", GSM)
    assert exact_match("  sys\n", "sys") and not exact_match("sys.path", "sys")


def test_completion_stops_at_end_of_text_then_at_stop_strings():
    tok = WordTokenizer(["a", "b", "c", "."])
    a, b, c, dot = (tok.encode(w)[0] for w in ("a", "b", "c", "."))
    assert completion_text(tok, [a, b, tok.eod_id, c], []) == "a b"
    assert completion_text(tok, [a, dot, b, c], ["."]) == "a "
    assert completion_text(tok, [a, dot, b, tok.eod_id, c], ["c", "b"]) == "a . "


def test_jsonl_fields_aliases_and_errors(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"prompt": "p1", "answer": "a1"}) + "\n\n" +
                    json.dumps({"question": "p2", "response": 42}) + "\n")
    assert load_generation_jsonl(str(path)) == [GenItem("p1", "a1"), GenItem("p2", "42")]
    assert load_generation_jsonl(str(path), limit=1) == [GenItem("p1", "a1")]
    path.write_text(json.dumps({"prompt": "p1", "answer": "a1"}) + "\n" + json.dumps({"prompt": "p2"}) + "\n")
    with pytest.raises(ValueError, match=r"g.jsonl:2: need an 'answer'"):
        load_generation_jsonl(str(path))
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n")
    with pytest.raises(ValueError, match=r"g.jsonl:1: a multiple-choice line"):
        load_generation_jsonl(str(path))


# ---- config checks --------------------------------------------------------------------------------
def test_generate_task_specs_are_checked_before_training(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    ok = {"name": "g", "path": str(path), "mode": "generate", "gen_length": 8, "block_length": 4, "steps": 4,
          "answer_regex": GSM, "stop": ["\n"]}
    (task,) = check_tasks([ok])
    assert task.mode == "generate" and sample_config(task).steps == 4
    for bad, field in (({"answer_regex": "(unclosed"}, r"eval.tasks\[0\].answer_regex"),
                       ({"gen_length": 0}, r"eval.tasks\[0\].gen_length"),
                       ({"block_length": 3}, r"eval.tasks\[0\].block_length=3 must divide"),
                       ({"steps": 3}, r"eval.tasks\[0\].steps=3 must be a multiple"),
                       ({"stop": [""]}, r"eval.tasks\[0\].stop"),
                       ({"stop": "\n"}, r"eval.tasks\[0\].stop"),
                       ({"mode": "sample"}, r"eval.tasks\[0\].mode"),
                       ({"decoding": "greedy"}, r"eval.tasks\[0\]: decoding='greedy' must be one of fixed, threshold"),
                       ({"cache": "kv"}, r"eval.tasks\[0\]: cache='kv' must be one of none, prefix, dual"),
                       ({"decoding": "threshold", "threshold": 1.5}, r"eval.tasks\[0\]: threshold=1.5 must be in")):
        with pytest.raises(ConfigError, match=field):
            check_tasks([{**ok, **bad}])
    (tmp_path / "mc.jsonl").write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1}) + "\n")
    with pytest.raises(ConfigError, match=r"eval.tasks\[0\]: .*mc.jsonl:1: a multiple-choice line"):
        check_tasks([{**ok, "path": str(tmp_path / "mc.jsonl")}])


# ---- the real sampler on hand-set logits ----------------------------------------------------------
def test_hand_set_logits_give_the_completion_they_dictate():
    """Every position prefers w3 except column 4 on, which prefers end-of-text: a 2-token prompt
    gets "w3 w3" then eod, so exact match with "w3 w3" is 1 and with "w3" is 0."""
    tok = WordTokenizer([f"w{i}" for i in range(12)])
    table = torch.zeros(32, 16)
    table[:, tok.encode("w3")[0]] = 5.0
    table[4:, tok.eod_id] = 9.0
    model = FixedLogits(table, tiny_config("dense", vocab=16, max_seq_len=32))
    items = [GenItem("w0 w1", "w3 w3"), GenItem("w5 w6", " w3 w3 "), GenItem("w0 w2", "w3")]
    task = EvalTaskConfig(name="t", path="-", mode="generate", gen_length=4, batch_size=2)
    assert evaluate_generation(model, tok, items, task) == {"exact_match": 2 / 3, "n": 3}
    regex = EvalTaskConfig(name="t", path="-", mode="generate", gen_length=4, answer_regex=r"(w\d)")
    assert evaluate_generation(model, tok, items, regex)["exact_match"] == 1.0   # first word only


# ---- a model trained on the colour task -----------------------------------------------------------
def colour_items(items) -> list:
    return [GenItem(it.prompt, it.choices[it.answer]) for it in items]


def train_colour_model(mc, tok, vocab: int, max_seq_len: int = 32, steps: int = 350) -> DiffusionTransformer:
    """A tiny EC model trained, pretraining-style (no prompt mask: independent of the SFT
    objective), on "the colour of thing<i> is <colour>" for the items of the colour task."""
    from model import forward_loss
    model = DiffusionTransformer(tiny_config("expert_choice", vocab=vocab, max_seq_len=max_seq_len), seed=0)
    rows = [tok.encode(it.prompt + " " + it.choices[it.answer]) for it in mc]
    L = max(map(len, rows))
    tokens = torch.zeros(len(rows), L, dtype=torch.long)
    valid = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, r in enumerate(rows):
        tokens[b, :len(r)], valid[b, :len(r)] = torch.tensor(r), True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):   # mask ratios in [0, 0.5): mostly the answer is guessed from the prompt
        u = torch.rand(len(rows), generator=g, dtype=torch.float64) * 0.5
        loss = forward_loss(model, tokens, u, torch.rand(tokens.shape, generator=g), valid).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    """(model, word tokenizer, MC items) of the colour task."""
    mc = make_task()
    tok = tokenizer_for(mc)
    return train_colour_model(mc, tok, len(tok.words)), tok, mc


def direct_exact_match(model, tok, items, task) -> float:
    """The same score by hand: one generate() per item, completion cut at the first end-of-text."""
    hits = 0
    for it in items:
        ids = generate(model, [prompt_ids(model, tok, it, task.gen_length)], sample_config(task)).generated_BG[0].tolist()
        ids = ids[:ids.index(tok.eod_id)] if tok.eod_id in ids else ids
        hits += extract_answer(tok.decode(ids), task.answer_regex) == it.answer
    return hits / len(items)


def test_trained_model_answers_by_generation(trained):
    """One generated token per prompt: the colour the model was trained on (chance about 1/8),
    batched and left-padded, equal to one-by-one generation; three tokens with a regex that takes
    the first word give the same answers."""
    model, tok, mc = trained
    items = colour_items(mc)
    task = EvalTaskConfig(name="c", path="-", mode="generate", gen_length=1, batch_size=5)
    res = evaluate_generation(model, tok, items, task)
    assert res["n"] == len(items) and res["exact_match"] >= 0.8, res
    assert res["exact_match"] == direct_exact_match(model, tok, items, task)
    words = EvalTaskConfig(name="c", path="-", mode="generate", gen_length=3, steps=3, block_length=1,
                           batch_size=5, answer_regex=r"^\s*(\S+)")
    assert evaluate_generation(model, tok, items, words)["exact_match"] == direct_exact_match(model, tok, items, words)
    assert evaluate_generation(model, tok, items, words)["exact_match"] >= 0.8


def test_evaluate_tasks_logs_exact_match(trained, tmp_path):
    model, tok, mc = trained
    path = tmp_path / "colours_gen.jsonl"
    path.write_text("".join(json.dumps({"prompt": it.prompt, "answer": it.answer}) + "\n"
                            for it in colour_items(mc)))
    tasks = [{"name": "gen", "path": str(path), "mode": "generate", "gen_length": 1, "every": 10, "limit": 8}]
    model.train()
    assert evaluate_tasks(model, tasks, tok, step=5) == {}
    row = evaluate_tasks(model, tasks, tok, step=10)
    assert set(row) == {"eval/gen/exact_match"} and row["eval/gen/exact_match"] >= 0.75
    assert model.training   # the caller's mode is restored


# ---- two gloo ranks -------------------------------------------------------------------------------
# (ep_size, capacity schedule or "tc", decoding): plain is fixed decoding with no cache; the fast
# ones decode by threshold with a block cache, so the ranks must agree on every step taken
CASES = ((1, "linear_reverse", "plain"), (2, "linear_reverse", "plain"), (2, "static", "plain"),
         (2, "linear_reverse", "threshold_dual"), (2, "static", "threshold_prefix"), (2, "tc", "threshold_dual"))
DECODINGS = {"plain": {}, "threshold_dual": {"decoding": "threshold", "threshold": 0.9, "cache": "dual"},
             "threshold_prefix": {"decoding": "threshold", "threshold": 0.9, "cache": "prefix"}}


def case_model(vocab: int, capacity: str, ep_size: int = 1, group=None) -> DiffusionTransformer:
    """EC with the capacity schedule, or dropless TC ("tc"), at the trained model's shapes."""
    if capacity == "tc":
        cfg = tiny_config("token_choice", vocab=vocab, max_seq_len=32, ep_size=ep_size)
    else:
        cfg = tiny_config("expert_choice", vocab=vocab, max_seq_len=32, capacity=capacity, ep_size=ep_size)
    return DiffusionTransformer(cfg, group) if ep_size > 1 else DiffusionTransformer(cfg)


def case_task(task, decoding: str):
    from dataclasses import replace
    return replace(task, **DECODINGS[decoding])


def _on_ranks(rank, world, state, vocab, items, words, task):
    """Every case in one spawn (start-up is most of the cost): data parallel, then the experts
    split over the two ranks (ep=2), each rank with its own prompts."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    out = {}
    for ep_size, capacity, decoding in CASES:
        model = case_model(vocab, capacity, ep_size, dist.group.WORLD)
        El, first = model.cfg.moe.num_experts // ep_size, (rank if ep_size > 1 else 0)
        model.load_state_dict({k: (v[first * El:(first + 1) * El] if ".experts." in k else v) for k, v in state.items()})
        out[ep_size, capacity, decoding] = evaluate_generation(model.eval(), WordTokenizer(words[4:]), items,
                                                               case_task(task, decoding))
    return out


def test_two_ranks_give_the_one_process_result(trained):
    """7 items on 2 ranks (one rank repeats one and drops it), batches of 3, prompts of different
    lengths, so ranks hold batches of different shapes. Under ep=2 every forward is an all-to-all
    and with static capacity its sizes follow from each rank's own shapes: the result must still
    be the one-process one, which it is only if every rank runs the same forwards. Threshold
    decoding takes as many steps as a rank's batch needs and early stop ends when a rank's rows
    have ended: the ranks must agree on both."""
    model, tok, mc = trained
    items = colour_items(mc[:6]) + [GenItem("a much longer question about thing3 that is", mc[3].choices[mc[3].answer])]
    task = EvalTaskConfig(name="c", path="-", mode="generate", gen_length=4, steps=4, block_length=2, batch_size=3,
                          answer_regex=r"^\s*(\S+)")
    one = {}
    for _, capacity, decoding in CASES:
        same = case_model(len(tok.words), capacity).eval()
        same.load_state_dict(model.state_dict())   # the trained weights, this capacity schedule
        one[capacity, decoding] = evaluate_generation(same, tok, items, case_task(task, decoding), rank=0, world=1)
    both = run_distributed(_on_ranks, 2, model.state_dict(), len(tok.words), items, tok.words, task)
    for case in CASES:
        assert both[0][case] == both[1][case] == one[case[1:]], case
    assert one["linear_reverse", "plain"]["n"] == 7 and one["linear_reverse", "plain"]["exact_match"] >= 5 / 7
    assert one["linear_reverse", "threshold_dual"]["exact_match"] >= 5 / 7
