"""Tests of the SFT data pipeline: `prepare --format sft` (records, templates, EOS fill, drops,
errors, storage) and SFTLoader / fixed_sft_eval_batches (layout independence, exact resume).

Every record, tokenizer and dataset is made here; nothing is downloaded.
"""

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors.numpy import load_file

from trainer.data import DataError, SFTLoader, check_vocab, data_format, fixed_sft_eval_batches
from trainer.data.prepare import PrepareConfig, prepare
from trainer.data.sft_records import SFTFields, SimpleTemplate, parse_record

REPO = Path(__file__).resolve().parents[2]
VOCAB = 400
SEQ_LEN = 64
WORDS = (
    "the of and to in is data model token mask noise diffusion expert router layer "
    "gradient batch shard seed answer question why how résumé naïve 日本語"
).split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _records(count: int = 80):
    """Prompt/response and chat records of varied length; some are too long for SEQ_LEN."""
    rng = random.Random(0)
    rows = []
    for i in range(count):
        long = i % 9 == 4
        response = f"reply {i} " + _words(rng, rng.randint(40, 60) if long else rng.randint(1, 12))
        if i % 3 == 0:
            rows.append({"prompt": f"ask {i} " + _words(rng, rng.randint(0, 8)), "response": response, "id": i})
        else:
            messages = [{"role": "user", "content": f"ask {i} " + _words(rng, rng.randint(1, 6))},
                        {"role": "assistant", "content": response}]
            if i % 3 == 2:
                messages = [{"role": "system", "content": "be brief"}, *messages,
                            {"role": "user", "content": "not used: after the last assistant message"}]
            rows.append({"messages": messages})
    return rows


def _expected_text(row):
    """The documented simple template, written out independently of the code under test."""
    if "messages" in row:
        *before, last = [m for m in row["messages"]][: max(i for i, m in enumerate(row["messages"])
                                                           if m["role"] == "assistant") + 1]
        return "".join(f"{m['role']}: {m['content']}\n" for m in before) + "assistant: ", last["content"]
    return row["prompt"], row["response"]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_prepare(*args):
    return subprocess.run([sys.executable, "-m", "trainer.data", "prepare", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    rows = _records()
    source = _write_jsonl(root / "chat.jsonl", rows)
    out = root / "data"
    proc = run_prepare("--format", "sft", "--files", source, "--out", out, "--seq-len", SEQ_LEN,
                       "--vocab-size", VOCAB, "--val-fraction", 0.2)
    assert proc.returncode == 0, proc.stderr
    return out, rows, proc


def _stored(split_dir: Path):
    data = load_file(str(split_dir / "examples.safetensors"))
    return data["tokens"], data["prompt_len"]


def test_examples_are_prompt_then_response_then_eos_fill(prepared):
    out, rows, proc = prepared
    top = json.loads((out / "meta.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    eod = top["eod_id"]
    expected, too_long = {}, []
    for i, row in enumerate(rows):
        prompt, response = _expected_text(row)
        p, r = sp.encode(prompt), sp.encode(response)
        if len(p) + len(r) + 1 > SEQ_LEN:
            too_long.append(i)
            continue
        tokens = np.array(p + r + [eod] * (SEQ_LEN - len(p) - len(r)), dtype=np.uint16)
        expected[tokens.tobytes()] = (i, len(p))
    assert len(expected) + len(too_long) == len(rows) and len(too_long) >= 5
    found = {}
    for split in ("train", "val"):
        tokens, prompt_len = _stored(out / split)
        meta = json.loads((out / split / "meta.json").read_text())
        assert tokens.dtype == np.uint16 and tokens.shape == (meta["num_examples"], SEQ_LEN)
        assert prompt_len.dtype == np.int32 and prompt_len.shape == (meta["num_examples"],)
        assert (meta["format"], meta["split"], meta["seq_len"]) == ("sft", split, SEQ_LEN)
        indices = []
        for row_tokens, length in zip(tokens, prompt_len):
            index, want_len = expected[row_tokens.tobytes()]  # KeyError: not an expected example
            assert length == want_len and row_tokens[-1] == eod  # at least one EOS ends every response
            indices.append(index)
        assert indices == sorted(indices)  # record order is kept within a split
        found[split] = indices
        assert meta["dropped_too_long"] + meta["num_examples"] >= meta["num_examples"] > 0
    assert sorted(found["train"] + found["val"]) == sorted(i for _, (i, _) in expected.items())
    assert found["val"][0] == 0  # the first record always goes to val
    assert top["format"] == "sft" and top["seq_len"] == SEQ_LEN and top["template"] == {"kind": "simple"}
    assert top["dropped_too_long"] == len(too_long) == sum(top["splits"][s]["dropped_too_long"] for s in ("train", "val"))
    assert top["num_examples"] == len(expected) and top["num_records"] == len(rows)
    assert f"dropped {len(too_long)} of {len(rows)} examples ({100 * len(too_long) / len(rows):.2f}%)" in proc.stderr


def test_check_vocab_and_format_of_an_sft_directory(prepared):
    out, _, _ = prepared
    for path in (out, out / "train", out / "val"):
        check_vocab(path, VOCAB, 0, 3)
        assert data_format(path) == "sft"
    with pytest.raises(DataError, match=f"vocab_size={VOCAB} .* but model.vocab_size=512"):
        check_vocab(out / "train", 512, 0, 3)


def test_simple_template_is_the_documented_one():
    record = parse_record({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "ignored"}]}, "x", SFTFields())
    assert SimpleTemplate().render(record) == ("system: Be brief.\nuser: 2+2?\nassistant: ", "4")
    pair = parse_record({"prompt": "Q: why?\nA:", "response": " because"}, "x", SFTFields())
    assert SimpleTemplate().render(pair) == ("Q: why?\nA:", " because")  # verbatim


def _hf_tokenizer_dir(root: Path) -> Path:
    """A tiny Hugging Face tokenizer (word level) with a chat template in tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<|mask|>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(WORDS + ["hi", "there", "reply", "ask"])))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    folder = root / "hf_tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    config = {"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_chat_template_of_a_hugging_face_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    folder = _hf_tokenizer_dir(tmp_path)
    rows = [{"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "the answer"}]},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why"},
                          {"role": "assistant", "content": "data"}]},
            {"prompt": "how", "response": "model token"}]
    out = tmp_path / "out"
    meta = prepare(PrepareConfig(out=str(out), format="sft", files=[str(_write_jsonl(tmp_path / "c.jsonl", rows))],
                                 seq_len=16, tokenizer=str(folder), val_fraction=0.0))
    assert meta["template"]["kind"] == "chat_template" and meta["tokenizer_trained"] is False
    assert (out / "tokenizer_config.json").read_text() == (folder / "tokenizer_config.json").read_text()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    eos = tok.token_to_id("</s>")
    # By hand: the generation prompt ends the prompt; the response carries the template's end of turn.
    want = [(ids("<s><|user|>hi there<|end|><|assistant|>"), ids("the answer<|end|>")),
            (ids("<s><|system|>be brief<|end|><|user|>why<|end|><|assistant|>"), ids("data<|end|>")),
            (ids("how"), ids("model token"))]  # prompt/response records stay verbatim
    got = {}
    for split in ("train", "val"):
        tokens, prompt_len = _stored(out / split)
        got.update({tuple(t[:n].tolist()): t for t, n in zip(tokens, prompt_len)})
    assert len(got) == 3
    for prompt, response in want:
        tokens = got[tuple(prompt)]  # KeyError: a prompt (or its length) is not the expected one
        assert tokens.tolist() == prompt + response + [eos] * (16 - len(prompt) - len(response))
    check_vocab(out, meta["vocab_size"], meta["pad_id"], meta["mask_id"])


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "response": "b"', r"line 3: not valid JSON"),
    ('{"prompt": "a"}', r"line 3: no field 'response'"),
    ('{"prompt": "a", "response": "   "}', r"line 3: field 'response' is empty"),
    ('{"prompt": 5, "response": "b"}', r"line 3: field 'prompt' holds int, not a string"),
    ('{"messages": [{"role": "user", "content": "a"}]}', r"line 3: field 'messages' has no message with role 'assistant'"),
    ('{"messages": [{"role": "user"}]}', r"line 3: messages\[0\] must be an object with string 'role' and 'content'"),
    ('["a", "b"]', r"line 3: a record must be a JSON object"),
])
def test_bad_records_name_file_line_and_field_before_any_work(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "x", "response": "y"}\n\n' + line + "\n" + '{"prompt": "x", "response": "z"}\n')
    out = tmp_path / "out"
    with pytest.raises(DataError, match=rf"{path}.*{message}"):
        prepare(PrepareConfig(out=str(out), format="sft", files=[str(path)], seq_len=32, vocab_size=VOCAB))
    assert not out.exists()  # failed in the checking pass: no tokenizer trained, nothing written


def test_cli_reports_a_bad_record_with_exit_status_2(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "answer": "b"}])
    proc = run_prepare("--format", "sft", "--files", path, "--out", tmp_path / "out", "--seq-len", 32)
    assert proc.returncode == 2
    assert f"{path} line 2: no field 'response' (fields: answer, prompt)" in proc.stderr


def test_sft_options_are_checked():
    with pytest.raises(DataError, match="--format sft needs --seq-len"):
        prepare(PrepareConfig(out="unused", format="sft", files=["x.jsonl"]))
    with pytest.raises(DataError, match="--seq-len is for --format sft only"):
        prepare(PrepareConfig(out="unused", files=["x.jsonl"], seq_len=64))
    with pytest.raises(DataError, match="needs its records"):
        prepare(PrepareConfig(out="unused", format="sft", seq_len=64))


def test_datasets_sources_match_the_jsonl_path(prepared, tmp_path):
    """A folder of JSON lines (through datasets.load_dataset, as a hub name goes) and a
    save_to_disk folder give the same examples as --files, and the same content lands in
    the same split however the records are ordered."""
    import datasets

    out, rows, _ = prepared
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in rows if "prompt" in r]
    folder = tmp_path / "jsonl"
    folder.mkdir()
    _write_jsonl(folder / "part.jsonl", rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    _write_jsonl(tmp_path / "reversed.jsonl", [rows[0]] + rows[:0:-1])
    results = {}
    for name, source in (("files", {"files": [str(folder / "part.jsonl")]}), ("load_dataset", {"dataset": str(folder)}),
                         ("load_from_disk", {"dataset": str(tmp_path / "saved")}),
                         ("reversed", {"files": [str(tmp_path / "reversed.jsonl")]})):
        dest = tmp_path / name
        prepare(PrepareConfig(out=str(dest), format="sft", seq_len=SEQ_LEN, tokenizer=str(out / "tokenizer.model"),
                              val_fraction=0.3, **source))
        results[name] = {s: _stored(dest / s) for s in ("train", "val")}
    for name in ("load_dataset", "load_from_disk"):
        for split in ("train", "val"):
            for a, b in zip(results[name][split], results["files"][split]):
                np.testing.assert_array_equal(a, b)
    for split in ("train", "val"):
        as_set = lambda r: sorted(t.tobytes() for t in r[split][0])  # noqa: E731
        assert as_set(results["reversed"]) == as_set(results["files"])
    assert len(results["files"]["train"][0]) > 0 and len(results["files"]["val"][0]) > 1


def _make(out, **kw):
    args = dict(seq_len=SEQ_LEN, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1, seed=3)
    return SFTLoader(out / "train", **{**args, **kw})


def _collect(loader, steps):
    """{step: {global offset: (tokens, prompt_mask)}} over `steps` optimizer steps."""
    seen = {}
    for _ in range(steps * loader.grad_accum_steps):
        batch = loader.next_micro_batch()
        assert batch.tokens.dtype == torch.int64 and batch.prompt_mask.dtype == torch.bool
        assert batch.tokens.shape == batch.prompt_mask.shape == (loader.micro_batch_size, SEQ_LEN)
        rows = seen.setdefault(batch.step, {})
        for offset, tokens, mask in zip(batch.global_offsets.tolist(), batch.tokens, batch.prompt_mask):
            assert offset not in rows
            rows[offset] = (tokens, mask)
    return seen


def _same(a, b):
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_one_epoch_visits_every_example_once_with_its_prompt_mask(prepared):
    out, _, _ = prepared
    tokens, prompt_len = _stored(out / "train")
    loader = _make(out, global_batch_size=1, micro_batch_size=1)
    n = loader.num_examples
    assert n == len(tokens)
    seen = _collect(loader, n + 5)  # into the second epoch
    loader.close()
    order = loader.permutation(0)
    assert sorted(order.tolist()) == list(range(n)) and order.tolist() != sorted(order.tolist())
    assert sorted(loader.permutation(1).tolist()) == list(range(n)) and not np.array_equal(order, loader.permutation(1))
    for step, rows in seen.items():
        got_tokens, mask = rows[0]
        index = loader.permutation(step // n)[step % n]
        np.testing.assert_array_equal(got_tokens.numpy(), tokens[index].astype(np.int64))
        assert mask.tolist() == [i < prompt_len[index] for i in range(SEQ_LEN)]


def test_global_batches_do_not_depend_on_layout(prepared):
    out, _, _ = prepared
    steps = _make(out).num_examples // 4 + 2  # runs past an epoch boundary
    reference = _collect(_make(out, micro_batch_size=4), steps)
    for micro, dp in ((1, 1), (1, 2), (2, 2)):
        merged = {}
        for rank in range(dp):
            loader = _make(out, micro_batch_size=micro, dp_size=dp, dp_rank=rank)
            for step, rows in _collect(loader, steps).items():
                assert not merged.setdefault(step, {}).keys() & rows.keys()
                merged[step].update(rows)
            loader.close()
        assert merged.keys() == reference.keys()
        for step in reference:
            assert sorted(merged[step]) == list(range(4))
            assert all(_same(merged[step][o], reference[step][o]) for o in range(4))
    other_seed = _collect(_make(out, micro_batch_size=4, seed=4), steps)
    assert not all(_same(other_seed[s][o], reference[s][o]) for s in reference for o in range(4))


def test_resume_is_exact_and_allows_a_new_layout(prepared):
    out, _, _ = prepared
    uninterrupted = _collect(_make(out, micro_batch_size=1, dp_size=2, dp_rank=1), 6)
    first = _make(out, micro_batch_size=1, dp_size=2, dp_rank=1)
    _collect(first, 3)
    state = first.state_dict()
    assert state == {"consumed_sequences": 12, "seed": 3, "seq_len": SEQ_LEN, "global_batch_size": 4,
                     "format_version": 1}
    first.next_micro_batch()
    with pytest.raises(RuntimeError, match="middle of step 3"):
        first.state_dict()
    first.close()
    resumed = _make(out, micro_batch_size=1, dp_size=2, dp_rank=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    after = _collect(resumed, 3)
    resumed.close()
    assert sorted(after) == [3, 4, 5]
    for step in after:
        assert all(_same(after[step][o], uninterrupted[step][o]) for o in uninterrupted[step])
    with _make(out, micro_batch_size=4) as whole:  # one rank now takes the whole global batch
        whole.load_state_dict(state)
        rows = _collect(whole, 1)[3]
    assert all(_same(rows[o], uninterrupted[3][o]) for o in uninterrupted[3])
    for field, value in (("seed", 9), ("global_batch_size", 8)):
        with pytest.raises(ValueError, match=f"{field} was {state[field]} when saved, now {value}"):
            _make(out, **{field: value}).load_state_dict(state)


def test_seq_len_must_match_the_prepared_one(prepared):
    out, _, _ = prepared
    with pytest.raises(DataError, match=rf"train.seq_len=128 but .*train was prepared with seq_len={SEQ_LEN}: "
                                        rf"re-run prepare --seq-len 128 or set train.seq_len={SEQ_LEN}"):
        _make(out, seq_len=128)
    with pytest.raises(DataError, match="seq_len=128"):
        fixed_sft_eval_batches(out / "val", 128, 2, 1)


def test_fixed_eval_batches_are_the_first_examples(prepared, caplog):
    out, _, _ = prepared
    tokens, prompt_len = _stored(out / "val")
    batches = fixed_sft_eval_batches(out / "val", SEQ_LEN, 2, 1)
    assert len(batches) == 1
    got_tokens, mask = batches[0]
    assert got_tokens.dtype == torch.int64 and mask.dtype == torch.bool and got_tokens.shape == (2, SEQ_LEN)
    np.testing.assert_array_equal(got_tokens.numpy(), tokens[:2].astype(np.int64))
    np.testing.assert_array_equal(mask.sum(1).numpy(), prompt_len[:2])
    with caplog.at_level(logging.WARNING):
        few = fixed_sft_eval_batches(out / "val", SEQ_LEN, 1, 10_000)
    assert len(few) == len(tokens) and "holds only" in caplog.text
    with pytest.raises(DataError, match=f"holds {len(tokens)} examples, fewer than one eval batch"):
        fixed_sft_eval_batches(out / "val", SEQ_LEN, len(tokens) + 1, 1)


def test_sft_loader_refuses_pretraining_data(prepared, tmp_path):
    out, _, _ = prepared
    (tmp_path / "a.txt").write_text("the data model token " * 50)
    (tmp_path / "b.txt").write_text("expert router layer " * 50)
    pre = tmp_path / "pre"
    prepare(PrepareConfig(out=str(pre), files=[str(tmp_path / "*.txt")], tokenizer=str(out / "tokenizer.model"),
                          num_workers=1, val_fraction=0.0))
    assert data_format(pre) == "pretrain"
    with pytest.raises(DataError, match="holds pretraining token shards, not SFT examples"):
        SFTLoader(pre / "train", SEQ_LEN, 4, 2, 0, 1, seed=0)
