"""lm-evaluation-harness end to end: lm_eval's own command line with the `ecdlm` model on local tasks
(multiple choice by ELBO, generation by the sampler, rolling perplexity) from files written here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.evaluation.test_multiple_choice import colour_run  # noqa: F401 (a fixture: the trained colour run)
from tests.trainer.launch import ROOT

MC = [{"question": "import os\nimport", "choices": ["sys", "zzzz qqq"], "answer": 0},
      {"question": "def main():\n    return", "choices": [" None", " 0 0 0 0 0"], "answer": 0},
      {"question": "The value of x is", "choices": ["one", "two", "three"], "answer": 1}]
GEN = [{"question": "import os\nimport", "answer": "sys"}, {"question": "class Foo(", "answer": "object"}]
TEXT = [{"text": "def f(x):\n    return x + 1\n" * 30}]   # longer than max_seq_len: several windows

TASKS = {
    "ecdlm_test_mc": """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "ecdlm_test_gen": """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    "ecdlm_test_ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
}


def write_tasks(root) -> None:
    for name, rows in (("ecdlm_test_mc", MC), ("ecdlm_test_gen", GEN), ("ecdlm_test_ppl", TEXT)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n" + TASKS[name])


def test_local_tasks_run_end_to_end(two_runs, tmp_path):
    write_tasks(tmp_path)
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "evaluation.lm_eval_adapter", "--model", "ecdlm",
                           "--model_args", f"path={two_runs['ec']},mc_num=8,mc_batch_size=8,block_length=4",
                           "--tasks", "ecdlm_test_mc", "ecdlm_test_gen", "ecdlm_test_ppl",
                           "--include_path", str(tmp_path), "--output_path", str(out), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1, proc.stdout + proc.stderr[-3000:]
    results = json.loads(files[0].read_text())["results"]
    acc = results["ecdlm_test_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and acc * 3 == round(acc * 3)
    assert 0.0 <= results["ecdlm_test_gen"]["exact_match,none"] <= 1.0
    bpb = results["ecdlm_test_ppl"]["bits_per_byte,none"]
    assert 0.0 < bpb < 20.0   # a finite bound from an ELBO, not a placeholder
    assert "ecdlm_test_mc" in proc.stdout and "acc" in proc.stdout   # lm_eval printed its table


def test_solves_a_task_the_model_was_trained_on(colour_run, tmp_path):
    """lm_eval's multiple choice (ranking the choices by the ELBO) on the colour task a tiny model
    was trained on (tests/evaluation/test_multiple_choice.py; chance 0.25): far above chance."""
    name = "ecdlm_test_colours"
    (tmp_path / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {colour_run['task']}\n"
        f"test_split: test\n" + TASKS["ecdlm_test_mc"])
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "evaluation.lm_eval_adapter", "--model", "ecdlm",
                           "--model_args", f"path={colour_run['checkpoint']},mc_num=8,mc_batch_size=8,greedy_check=false",
                           "--tasks", name, "--include_path", str(tmp_path), "--output_path", str(out),
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results,) = [json.loads(f.read_text())["results"] for f in out.rglob("results_*.json")]
    acc = results[name]["acc,none"]
    assert acc >= 0.7 and acc * 24 == round(acc * 24), results[name]


class _Req:
    def __init__(self, *args):
        self.args = args


def _adapter(make_table, **opts):
    from tests.evaluation.conftest import FixedLogits, tiny_config
    from tests.evaluation.test_multiple_choice import WordTokenizer
    from evaluation.lm_eval_adapter import ECDLM
    tok = WordTokenizer([f"w{i}" for i in range(12)])   # ids 4..15
    model = FixedLogits(make_table(tok), tiny_config("dense", vocab=16, max_seq_len=32))
    return ECDLM.from_model(model, tok, **opts), tok


def test_rolling_windows_score_every_token_once():
    """Zero logits: each token costs exactly log V whatever the window, so the total is N log V."""
    import math
    import torch
    lm, _ = _adapter(lambda tok: torch.zeros(32, 16), mc_num=4, mc_batch_size=4)
    text = " ".join(f"w{i % 12}" for i in range(75))   # 75 tokens: three windows of at most 31
    (ll,) = lm.loglikelihood_rolling([_Req(text)])
    assert abs(ll + 75 * math.log(16)) < 1e-6


def test_is_greedy_follows_the_sampler():
    import torch
    def table(tok):   # every position after the two-token context prefers "w3"
        t = torch.zeros(32, 16)
        t[2:, tok.encode("w3")[0]] = 5.0
        return t
    lm, tok = _adapter(table, mc_num=4, mc_batch_size=4)
    (a, greedy), (b, not_greedy) = lm.loglikelihood([_Req("w0 w1", " w3 w3"), _Req("w0 w1", " w3 w4")])
    assert greedy and not not_greedy and a > b
    out = lm.generate_until([_Req("w0 w1", {"until": ["w4"], "max_gen_toks": 3})])
    assert out == ["w3 w3 w3"]


def test_fast_decoding_model_args():
    """decoding, threshold, cache and early_stop as model arguments: hand-set logits end every row
    with end-of-text after two words; early stop cuts there, in fewer forwards than fixed decoding;
    a bad value fails when the adapter is built, naming it."""
    import pytest
    import torch

    def table(tok):
        t = torch.zeros(32, 16)
        t[2:, tok.encode("w3")[0]] = 5.0
        t[4:, tok.eod_id] = 9.0
        return t
    fast, tok = _adapter(table, decoding="threshold", threshold="0.5", cache="dual", early_stop="true", block_length=4)
    plain, _ = _adapter(table, block_length=4)
    reqs = [_Req("w0 w1", {"until": ["w9"], "max_gen_toks": 8})]
    assert fast.generate_until(reqs) == ["w3 w3"]
    assert plain.generate_until(reqs)[0].startswith("w3 w3")
    calls = len(fast.model.calls)
    fast.generate_until(reqs)
    assert len(fast.model.calls) - calls == 1   # the first block: everything above 0.5, then every row ended
    with pytest.raises(ValueError, match="cache='kv' must be one of none, prefix, dual"):
        _adapter(table, cache="kv")
