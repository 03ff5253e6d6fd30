"""The lm-eval task written by `python -m evaluation.lm_eval_local_task` for a local generation file:
run by lm_eval.simple_evaluate with the ecdlm adapter on a checkpoint of a tiny model trained on
the colour task, it reports the exact match evaluate_generation gives the same model; and the
writer's checks (regex groups, templates rendered by lm-eval's engine, bad input)."""
from __future__ import annotations

import json

import pytest
import yaml

from evaluation.generation_tasks import GenItem, evaluate_generation, reference_answer
from evaluation.lm_eval_local_task import main, target_template, write_task
from tests.evaluation.test_generation_tasks import GSM, colour_items, train_colour_model
from tests.evaluation.test_multiple_choice import make_task
from evaluation.task_config import EvalTaskConfig


@pytest.fixture(scope="module")
def colour_checkpoint(tmp_path_factory):
    """A run directory of the colour model with a real sentencepiece tokenizer (every word but the
    numbers one piece) and a safetensors checkpoint, as evaluation.loading.load_run reads it; and a generation
    file of the task, the reference answers in GSM8K's "... #### answer" form."""
    from safetensors.torch import save_file

    from evaluation.hf.ecdlm_format import sections
    from rundir.tokenizer import Tokenizer
    from rundir.checkpoints import file_digest, tag_for, write_manifest
    from trainer.data.tokenizer import load_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("colour_gen_run")
    mc = make_task()
    blob = train_tokenizer([it.prompt + " " + c for it in mc for c in it.choices] * 4, 379, "bpe", 1)   # 379: every merge this text allows
    (root / "data").mkdir()
    (root / "data" / "tokenizer.model").write_bytes(blob)
    sp, info = load_tokenizer(blob)
    tok = Tokenizer(sp, info.pad_id, info.eod_id, info.mask_id, info.vocab_size)
    model = train_colour_model(mc, tok, info.vocab_size, steps=600)   # digits are pieces of their own here
    run = {**sections(model.cfg), "train": {"run_name": "colours", "output_dir": str(root), "seq_len": 32},
           "data": {"path": str(root / "data")}}
    (root / "config.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    ckpt = root / "checkpoints" / tag_for(600)
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    # a real manifest: every reader verifies it (issue 20)
    write_manifest(str(ckpt), 600, {"model.safetensors": file_digest(str(ckpt / "model.safetensors"))}, healthy=True)
    items = colour_items(mc)
    task = root / "colours_gen.jsonl"
    task.write_text("".join(json.dumps({"question": it.prompt, "answer": f"it is {it.answer} #### {it.answer}"}) + "\n"
                            for it in items))
    return {"checkpoint": ckpt, "task": task, "items": items, "model": model, "tokenizer": tok}


def test_lm_eval_scores_the_local_task_like_eval_tasks(colour_checkpoint, tmp_path, monkeypatch):
    """Greedy one-token answers ("red") against "it is red #### red" reduced by the regex: lm-eval's
    exact_match equals evaluate_generation's on the model in memory, and is far above chance."""
    for var, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf")),
                       ("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets")), ("TOKENIZERS_PARALLELISM", "false")):
        monkeypatch.setenv(var, value)
    regex = r"(?:####\s*)?([a-z]+)\s*$"   # the reference's last word; a bare completion "red" matches too
    out = tmp_path / "tasks"
    assert main(["--jsonl", str(colour_checkpoint["task"]), "--name", "ecdlm_colours_gen", "--out", str(out),
                 "--answer-regex", regex, "--max-gen-toks", "1", "--until", "\n"]) == 0
    import lm_eval
    import evaluation.lm_eval_adapter  # noqa: F401 (registers the ecdlm model)
    from lm_eval.tasks import TaskManager
    res = lm_eval.simple_evaluate(model="ecdlm", model_args=f"path={colour_checkpoint['checkpoint']}",
                                  tasks=["ecdlm_colours_gen"], task_manager=TaskManager(include_path=str(out)),
                                  device="cpu")
    lm_em = res["results"]["ecdlm_colours_gen"]["exact_match,answer"]
    here = evaluate_generation(colour_checkpoint["model"], colour_checkpoint["tokenizer"],
                               [GenItem(it.prompt, f"it is {it.answer} #### {it.answer}") for it in colour_checkpoint["items"]],
                               EvalTaskConfig(name="c", path="-", mode="generate", gen_length=1, answer_regex=regex,
                                              stop=["\n"]))
    assert here["n"] == 24 and lm_em == here["exact_match"], (lm_em, here)
    assert lm_em >= 0.6   # chance about 1/8


def test_target_template_reduces_the_reference_like_eval_tasks():
    from lm_eval.utils import apply_template
    for answer, pattern in (("Natalia sold 48 + 24 = 72 #### 72", GSM), ("42", GSM), ("x 'q' \\ y", r"'(\w)'"),
                            ("Done. ANSWER: Blue\n", r"(?i)answer:\s*(\w+)"), ("  plain  ", None), (7, None)):
        got = apply_template(target_template(pattern), {"answer": answer})
        assert got == reference_answer(str(answer), pattern), (answer, pattern, got)


def test_writer_refuses_bad_input_before_writing(tmp_path):
    data = tmp_path / "g.jsonl"
    data.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    out = tmp_path / "out"
    for kw, message in (({"pattern": "(a)(b)"}, "has 2 groups"), ({"pattern": "(unclosed"}, "not a valid regular"),
                        ({"name": "a/b"}, "--name"), ({"max_gen_toks": 0}, "--max-gen-toks"),
                        ({"jsonl": str(tmp_path / "missing.jsonl")}, "is not a file")):
        args = {"jsonl": str(data), "name": "t", "out_dir": str(out), **kw}
        with pytest.raises(ValueError, match=message):
            write_task(**args)
    data.write_text(json.dumps({"prompt": "p"}) + "\n")
    assert main(["--jsonl", str(data), "--name", "t", "--out", str(out)]) == 2
    assert not out.exists()
    data.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    spec = yaml.safe_load(open(write_task(str(data), "t", str(out), until=["\n\n"])))
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(data.resolve())
    assert spec["generation_kwargs"]["until"] == ["\n\n"] and spec["output_type"] == "generate_until"
    # a shell passes "\n" as backslash + n: the command line reads it as a newline
    assert main(["--jsonl", str(data), "--name", "u", "--out", str(out), "--until", "\\n", "--until", "Q:"]) == 0
    assert yaml.safe_load(open(out / "u.yaml"))["generation_kwargs"]["until"] == ["\n", "Q:"]
