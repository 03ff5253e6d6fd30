"""Tests of the data pipeline: prepare (as a subprocess, like the Makefile runs it) and the loader.

Every corpus is generated here; nothing is downloaded.
"""

import gc
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from trainer.data import DataError, PackedLoader, TokenStore, check_vocab, fixed_eval_batches
from trainer.data.corpus import StdlibCorpus
from trainer.data.packing import PackedSequences
from trainer.data.prepare import PrepareConfig, prepare

REPO = Path(__file__).resolve().parents[2]
VOCAB = 400
SEQ_LEN = 300  # does not divide SHARD_TOKENS: some sequences straddle two shards
SHARD_TOKENS = 4096
WORDS = (
    "the of and to in is data model token mask noise diffusion expert router layer "
    "gradient batch shard seed résumé naïve 日本語 Ünïcödé"
).split()


def _doc_text(i: int) -> str:
    rng = random.Random(i)
    lines = [f"document {i}"]
    for _ in range(rng.randint(30, 70)):
        indent = " " * rng.choice((0, 0, 4, 8))
        lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) + rng.choice(".,:;"))
    if i == 7:
        # The literal mask spelling must stay plain text, never become the mask token.
        lines.append("a literal <|mask|> in the text\tand a tab")
    return "\n".join(lines) + "\n"


def run_prepare(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "trainer.data", "prepare", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    texts = {}
    for i in range(40):
        name = f"doc{i:03d}.txt"
        texts[name] = _doc_text(i)
        (root / name).write_text(texts[name], encoding="utf-8")
    (root / "bad.txt").write_bytes(b"\xff\xfe\xfa invalid")
    (root / "empty.txt").write_bytes(b"")
    return root, texts


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    root, texts = corpus
    out = tmp_path_factory.mktemp("prepared") / "data"
    proc = run_prepare(
        "--files", root / "*.txt", "--out", out, "--vocab-size", VOCAB,
        "--val-fraction", 0.1, "--shard-tokens", SHARD_TOKENS, "--num-workers", 2,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc


def _stream(split_dir: Path) -> np.ndarray:
    meta = json.loads((split_dir / "meta.json").read_text())
    parts = [np.fromfile(split_dir / s["file"], dtype="<u2") for s in meta["shards"]]
    return np.concatenate(parts)


def test_prepare_writes_consistent_splits(prepared):
    out, _ = prepared
    top = json.loads((out / "meta.json").read_text())
    assert top["format_version"] == 1
    assert (top["num_docs"], top["skipped_docs"]) == (40, 2)
    assert top["splits"]["train"]["num_docs"] + top["splits"]["val"]["num_docs"] == 40
    assert top["splits"]["val"]["num_docs"] >= 1 and top["splits"]["train"]["num_docs"] >= 1
    assert not (out / ".prepare-tmp").exists()
    for split in ("train", "val"):
        meta = json.loads((out / split / "meta.json").read_text())
        stream = _stream(out / split)
        doc_index = np.load(out / split / "doc_index.npy")
        assert meta["split"] == split and meta["dtype"] == "uint16"
        assert meta["num_tokens"] == sum(s["num_tokens"] for s in meta["shards"]) == len(stream) == doc_index[-1]
        assert meta["num_tokens"] == top["splits"][split]["num_tokens"]
        assert all(s["num_tokens"] == SHARD_TOKENS for s in meta["shards"][:-1])
        assert doc_index.dtype == np.int64 and doc_index[0] == 0 and len(doc_index) == meta["num_docs"] + 1
        assert np.all(np.diff(doc_index) > 1)
        # EOD closes every document and occurs nowhere else.
        assert np.all(stream[doc_index[1:] - 1] == meta["eod_id"])
        assert np.count_nonzero(stream == meta["eod_id"]) == meta["num_docs"]
        assert meta["tokenizer_sha256"] == top["tokenizer_sha256"]
    assert len(json.loads((out / "train" / "meta.json").read_text())["shards"]) > 2


def test_documents_round_trip_in_corpus_order(prepared, corpus):
    out, _ = prepared
    _, texts = corpus
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    decoded = {}
    for split in ("train", "val"):
        stream, doc_index = _stream(out / split), np.load(out / split / "doc_index.npy")
        docs = [sp.decode(stream[a : b - 1].tolist()) for a, b in zip(doc_index[:-1], doc_index[1:])]
        names = [next(n for n, t in texts.items() if t == d) for d in docs]  # StopIteration = no round trip
        assert names == sorted(names)  # corpus order is kept within a split
        decoded[split] = names
    assert sorted(decoded["train"] + decoded["val"]) == sorted(texts)
    assert decoded["val"][0] == "doc000.txt"  # the first document always goes to val


def test_bad_and_empty_files_are_skipped_and_named(prepared):
    _, proc = prepared
    assert "skipping bad.txt: not valid UTF-8" in proc.stderr
    assert "skipping empty.txt: empty" in proc.stderr
    assert "(2 skipped)" in proc.stderr
    assert "tokens/s" in proc.stderr


def test_special_token_ids(prepared):
    out, _ = prepared
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["pad_id"], meta["unk_id"], meta["eod_id"], meta["mask_id"]) == (0, 1, 2, 3)
    assert meta["vocab_size"] == VOCAB
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert (sp.pad_id(), sp.unk_id(), sp.eos_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert sp.piece_to_id("<|mask|>") == 3 and sp.get_piece_size() == VOCAB
    for split in ("train", "val"):  # doc 7 contains the literal text "<|mask|>"
        stream = _stream(out / split)
        assert not np.any(stream == meta["mask_id"]) and not np.any(stream == meta["pad_id"])


def test_jsonl_with_given_tokenizer_and_custom_field(prepared, tmp_path):
    out, _ = prepared
    rows = [{"id": i, "body": _doc_text(100 + i)} for i in range(12)]
    rows[5]["body"] = ""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out2 = tmp_path / "out"
    proc = run_prepare("--files", path, "--text-field", "body", "--tokenizer", out / "tokenizer.model",
                       "--out", out2, "--num-workers", 1)
    assert proc.returncode == 0, proc.stderr
    assert "skipping row 5: empty" in proc.stderr
    top, given = json.loads((out2 / "meta.json").read_text()), json.loads((out / "meta.json").read_text())
    assert top["tokenizer_sha256"] == given["tokenizer_sha256"]
    assert (out2 / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
    assert top["num_docs"] == 11 and top["skipped_docs"] == 1 and top["tokenizer_trained"] is False
    sp = spm.SentencePieceProcessor(model_file=str(out2 / "tokenizer.model"))
    stream, doc_index = _stream(out2 / "val"), np.load(out2 / "val" / "doc_index.npy")
    assert sp.decode(stream[: doc_index[1] - 1].tolist()) == rows[0]["body"]


def test_missing_text_field_names_field_and_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"body": "some text", "id": 1}\n{"body": "more text", "id": 2}\n')
    with pytest.raises(DataError, match=r"no field 'content' \(available: body, id\)"):
        prepare(PrepareConfig(out=str(tmp_path / "out"), files=[str(path)], text_field="content"))


def test_mixed_extensions_are_rejected(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match=r"mixes file formats.*b\.jsonl.*a\.txt"):
        prepare(PrepareConfig(out=str(tmp_path / "out"), files=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]))


def test_failed_prepare_keeps_previous_output(prepared, tmp_path):
    out, _ = prepared
    before = (out / "meta.json").read_bytes()
    with pytest.raises(DataError, match="no such file"):
        prepare(PrepareConfig(out=str(out), files=[str(tmp_path / "missing.txt")], overwrite=True))
    assert (out / "meta.json").read_bytes() == before and not (out / ".prepare-tmp").exists()


def test_unreachable_hub_fails_clearly(tmp_path):
    proc = run_prepare("--dataset", "someone/some-dataset", "--out", tmp_path / "out",
                       env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "could not open dataset 'someone/some-dataset'" in proc.stderr
    assert not (tmp_path / "out" / "meta.json").exists()


def test_store_reads_across_shards(prepared):
    out, _ = prepared
    store, stream = TokenStore(out / "train"), _stream(out / "train")
    assert store.num_tokens == len(stream)
    np.testing.assert_array_equal(store[:], stream)
    np.testing.assert_array_equal(store.read(SHARD_TOKENS - 5, SHARD_TOKENS + 7), stream[SHARD_TOKENS - 5 : SHARD_TOKENS + 7])
    np.testing.assert_array_equal(store.doc_index(), np.load(out / "train" / "doc_index.npy"))


def _collect(loader: PackedLoader, steps: int):
    """{step: {global offset: tokens}} over `steps` optimizer steps."""
    seen = {}
    for _ in range(steps * loader.grad_accum_steps):
        batch = loader.next_micro_batch()
        rows = seen.setdefault(batch.step, {})
        for offset, tokens in zip(batch.global_offsets.tolist(), batch.tokens):
            assert offset not in rows
            rows[offset] = tokens
    return seen


def _make(out, **kw):
    args = dict(seq_len=SEQ_LEN, global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=1, seed=3)
    return PackedLoader(out / "train", **{**args, **kw})


def test_packing_covers_the_stream_exactly(prepared):
    out, _ = prepared
    stream = _stream(out / "train")
    loader = _make(out, global_batch_size=1, micro_batch_size=1)
    n = loader.num_sequences
    assert n == len(stream) // SEQ_LEN
    by_index = {}
    for _ in range(n):  # exactly one epoch
        batch = loader.next_micro_batch()
        assert batch.tokens.dtype == torch.int64 and batch.tokens.shape == (1, SEQ_LEN)
        by_index[loader.sequences.permutation(0)[batch.step]] = batch.tokens[0].numpy()
    loader.close()
    assert sorted(by_index) == list(range(n))
    packed = np.concatenate([by_index[i] for i in range(n)])
    np.testing.assert_array_equal(packed, stream[: n * SEQ_LEN])


def test_shuffle_is_deterministic_by_seed(prepared):
    out, _ = prepared
    a, b, c = _collect(_make(out), 3), _collect(_make(out), 3), _collect(_make(out, seed=4), 3)
    flat = lambda d: torch.stack([d[s][o] for s in sorted(d) for o in sorted(d[s])])  # noqa: E731
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))
    store = TokenStore(out / "train")
    in_order = torch.from_numpy(store.read(0, 24 * SEQ_LEN).astype(np.int64)).view(24, SEQ_LEN)
    assert not torch.equal(flat(a), in_order)
    seqs = PackedSequences(store, SEQ_LEN, 3)
    assert not np.array_equal(seqs.permutation(0), seqs.permutation(1))


def test_micro_batch_positions_follow_the_documented_layout(prepared):
    out, _ = prepared
    loader = _make(out, global_batch_size=12, micro_batch_size=2, dp_size=2, dp_rank=1)
    got = [(b.step, b.micro_step, b.global_offsets.tolist()) for b in (loader.next_micro_batch() for _ in range(4))]
    loader.close()
    assert got == [(0, 0, [2, 3]), (0, 1, [6, 7]), (0, 2, [10, 11]), (1, 0, [2, 3])]
    assert loader.positions(1, 0).tolist() == [14, 15]


def test_global_batches_do_not_depend_on_layout(prepared):
    out, _ = prepared
    steps = _make(out).num_sequences // 8 + 2  # runs past an epoch boundary
    reference = _collect(_make(out, micro_batch_size=8), steps)
    for micro, dp in ((2, 2), (1, 4), (4, 2)):
        merged = {}
        for rank in range(dp):
            loader = _make(out, micro_batch_size=micro, dp_size=dp, dp_rank=rank)
            assert loader.grad_accum_steps == 8 // (micro * dp)
            for step, rows in _collect(loader, steps).items():
                assert not merged.setdefault(step, {}).keys() & rows.keys()
                merged[step].update(rows)
            loader.close()
        assert merged.keys() == reference.keys()
        for step in reference:
            assert sorted(merged[step]) == list(range(8))
            assert all(torch.equal(merged[step][o], reference[step][o]) for o in range(8))


def test_resume_is_exact_and_allows_a_new_layout(prepared):
    out, _ = prepared
    uninterrupted = _collect(_make(out, micro_batch_size=1, dp_size=2, dp_rank=1), 7)
    first = _make(out, micro_batch_size=1, dp_size=2, dp_rank=1)
    _collect(first, 4)
    state = first.state_dict()
    assert state == {"consumed_sequences": 32, "seed": 3, "seq_len": SEQ_LEN, "global_batch_size": 8, "format_version": 1}
    first.next_micro_batch()
    with pytest.raises(RuntimeError, match="middle of step 4"):  # no resumable state mid-step
        first.state_dict()
    # Rewinding a running loader drops what it had prefetched for later steps.
    first.load_state_dict({**state, "consumed_sequences": 16})
    rewound = _collect(first, 1)[2]
    assert all(torch.equal(rewound[o], uninterrupted[2][o]) for o in uninterrupted[2])
    first.close()
    resumed = _make(out, micro_batch_size=1, dp_size=2, dp_rank=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    after = _collect(resumed, 3)
    assert sorted(after) == [4, 5, 6]
    for step in after:
        assert all(torch.equal(after[step][o], uninterrupted[step][o]) for o in uninterrupted[step])
    # Another layout resumes the same global batches.
    other = _make(out, micro_batch_size=8)
    other.load_state_dict(state)
    whole = _collect(other, 1)[4]
    assert all(torch.equal(whole[o], uninterrupted[4][o]) for o in uninterrupted[4])
    for field, value in (("seed", 9), ("seq_len", 64), ("global_batch_size", 16)):
        with pytest.raises(ValueError, match=f"{field} was {state[field]} when saved, now {value}"):
            _make(out, **{field: value}).load_state_dict(state)


def test_loader_reports_wait_time_and_stops_its_thread(prepared):
    out, _ = prepared
    loader = _make(out, prefetch=1)
    loader.next_micro_batch()
    thread = loader._thread
    assert thread.daemon and thread.is_alive()
    assert isinstance(loader.wait_seconds, float) and loader.wait_seconds >= 0
    loader.close()
    assert not thread.is_alive()
    loader.close()  # idempotent
    forgotten = _make(out)
    forgotten.next_micro_batch()
    thread = forgotten._thread
    del forgotten  # never closed: collecting it must still stop its thread
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_batch_size_must_divide(prepared):
    out, _ = prepared
    with pytest.raises(ValueError, match="global_batch_size=10.*micro_batch_size=4.*dp_size=2"):
        _make(out, global_batch_size=10, micro_batch_size=4, dp_size=2)


def test_check_vocab_names_both_numbers(prepared):
    out, _ = prepared
    check_vocab(out, VOCAB, 0, 3)
    with pytest.raises(ValueError, match=rf"vocab_size={VOCAB} \(tokenizer sha256 [0-9a-f]+\.\.\.\), but model.vocab_size=4096; set model.vocab_size={VOCAB}"):
        check_vocab(out, 4096, 0, 3)
    with pytest.raises(ValueError, match="mask_id=3 .* but model.mask_id=5"):
        check_vocab(json.loads((out / "meta.json").read_text()), VOCAB, 0, 5)


def test_fixed_eval_batches_are_the_stream_prefix(prepared):
    out, _ = prepared
    batches = fixed_eval_batches(out / "train", 50, 4, 3)
    again = fixed_eval_batches(out / "train", 50, 4, 3)
    assert len(batches) == 3 and all(torch.equal(a, b) for a, b in zip(batches, again))
    np.testing.assert_array_equal(torch.cat(batches).flatten().numpy(), _stream(out / "train")[: 3 * 4 * 50])
    assert len(fixed_eval_batches(out / "val", 50, 4, 10_000)) < 10_000  # capped to what val holds


def test_default_corpus_end_to_end(tmp_path):
    out = tmp_path / "default"
    proc = run_prepare("--out", out, "--max-docs", 200)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["kind"] == "stdlib" and meta["num_docs"] == 200
    assert meta["vocab_size"] == 4096 and meta["splits"]["val"]["num_tokens"] > 0
    first = next(StdlibCorpus().documents())
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    val, doc_index = TokenStore(out / "val"), np.load(out / "val" / "doc_index.npy")
    assert sp.decode(val.read(0, int(doc_index[1]) - 1).tolist()) == first.text
    loader = PackedLoader(out / "train", 256, 4, 2, 0, 1, seed=0)
    batch = loader.next_micro_batch()
    loader.close()
    assert batch.tokens.shape == (2, 256) and int(batch.tokens.max()) < meta["vocab_size"]
