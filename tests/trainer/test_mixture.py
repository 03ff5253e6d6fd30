"""Data mixtures (trainer/data/mixture.py), in one process with the real loader classes: the
blending rule per batch, batches equal across layouts, each source's own shuffled stream and its
epochs, exact resume at another layout, the config forms, and each refusal through the entry point."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rundir.config import MixtureEntry, load_config
from trainer.data import DataError, PackedLoader, TokenStore
from trainer.data.mixture import (MixtureLoader, MixturePlan, check_sources, normalization_note, resolve_sources,
                                  source_seed)
from trainer.data.packing import PackedSequences

ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN, G, STEPS = 64, 16, 200
WORDS = "what is the answer question because therefore data mixture source weight blend epoch".split()


def prepare(*args):
    proc = subprocess.run([sys.executable, "-m", "trainer.data", "prepare", *map(str, args), "--num-workers", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def write_qa(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(folder / "qa.jsonl", "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))
            f.write(json.dumps({"text": f"Question {i}: {q}?\nAnswer: {a}."}) + "\n")
    return folder / "qa.jsonl"


@pytest.fixture(scope="module")
def sources(small_corpus, tmp_path_factory):
    """web: the shared stdlib corpus; qa: a small question-answer corpus tokenized with web's
    tokenizer (it runs out many times in 200 batches); other: stdlib text with a tokenizer of its own
    (same vocabulary size, different model)."""
    root = tmp_path_factory.mktemp("mix")
    qa_file = write_qa(root / "raw", 300)
    prepare("--out", root / "qa", "--files", qa_file, "--tokenizer", small_corpus / "tokenizer.model",
            "--val-fraction", 0.1)
    prepare("--out", root / "other", "--max-docs", 80, "--vocab-size", 1024, "--model-type", "unigram")
    return {"web": small_corpus, "qa": root / "qa", "other": root / "other"}


def mixture(sources, weights=(0.7, 0.3), names=("web", "qa")):
    return resolve_sources([MixtureEntry(str(sources[n]), w, name=n) for n, w in zip(names, weights)])


def global_batches(srcs, dp_size: int, micro: int, steps: int, start_state=None, seed=7) -> list:
    """Every rank's micro-batches of each step put back in global order, as the trainer's ranks
    would see them: [(tokens [G, L], source_ids [G]) per step]."""
    loaders = [MixtureLoader(srcs, "train", "pretrain", SEQ_LEN, G, micro, r, dp_size, seed, prefetch=2)
               for r in range(dp_size)]
    if start_state is not None:
        for loader in loaders:
            loader.load_state_dict(start_state)
    out = []
    for _ in range(steps):
        tokens, ids = torch.full((G, SEQ_LEN), -1, dtype=torch.int64), torch.full((G,), -1, dtype=torch.int64)
        for loader in loaders:
            for _ in range(loader.grad_accum_steps):
                mb = loader.next_micro_batch()
                tokens[mb.global_offsets], ids[mb.global_offsets] = mb.tokens, mb.source_ids
        assert (ids >= 0).all()
        out.append((tokens, ids))
    for loader in loaders:
        loader.close()
    return out, loaders[0]


def test_plan_holds_each_share_within_one_sequence_and_tracks_the_weights():
    for weights, g in (((0.7, 0.3), 16), ((0.5, 0.5), 15), ((0.2, 0.3, 0.5), 16), ((0.13, 0.29, 0.41, 0.17), 10)):
        plan, w = MixturePlan(weights, g, seed=3), np.asarray(weights)
        for s in range(500):
            counts = plan.counts(s)
            assert counts.sum() == g and (np.abs(counts - w * g) < 1).all(), (weights, s, counts)
            # the long run follows the weights, not the rounded shares (0.7 x 16 = 11.2, never 11 every time)
            assert (np.abs(plan.consumed(s + 1) - w * g * (s + 1)) < 1).all(), (weights, s)


def test_proportions_over_200_batches_on_1_and_2_ranks_and_equal_batches(sources):
    srcs = mixture(sources)
    layouts = {(1, 16): None, (1, 4): None, (2, 8): None, (2, 2): None}
    for dp, micro in layouts:
        layouts[(dp, micro)], _ = global_batches(srcs, dp, micro, STEPS)
    reference = layouts[(1, 16)]
    w = np.array([s.weight for s in srcs])
    for step, (tokens, ids) in enumerate(reference):
        counts = np.bincount(ids.numpy(), minlength=2)
        assert (np.abs(counts - w * G) < 1).all(), f"step {step}: counts {counts}, shares {w * G}"
    for key, batches in layouts.items():
        for step, ((t0, i0), (t1, i1)) in enumerate(zip(reference, batches)):
            assert torch.equal(t0, t1) and torch.equal(i0, i1), f"layout {key} differs at step {step}"
    # each source reads its own seeded shuffle in order, epoch after epoch (qa runs out several times)
    order = [[] for _ in srcs]
    for tokens, ids in reference:
        for row, i in zip(tokens, ids.tolist()):
            order[i].append(row)
    for i, src in enumerate(srcs):
        seqs = PackedSequences(TokenStore(Path(src.path) / "train"), SEQ_LEN, source_seed(7, src.name))
        want = torch.from_numpy(seqs.batch(range(len(order[i]))))
        assert torch.equal(torch.stack(order[i]), want), src.name
    qa = PackedSequences(TokenStore(Path(srcs[1].path) / "train"), SEQ_LEN, source_seed(7, "qa"))
    assert len(order[1]) > 2 * qa.num_sequences   # the qa source went round more than twice
    assert not np.array_equal(qa.permutation(0), qa.permutation(1))   # a new shuffle each epoch


def test_epochs_are_logged_and_counted(sources):
    srcs = mixture(sources)
    loader = MixtureLoader(srcs, "train", "pretrain", SEQ_LEN, G, 16, 0, 1, 7)
    n = loader.readers[1].num
    lines = [line for s in range(STEPS) for line in loader.new_epochs(s, s + 1)]
    row = loader.accounting(STEPS)
    consumed = row["data/sequences/qa"]
    assert len(lines) == (consumed - 1) // n and lines, lines
    assert lines[0] == (f"data: source qa ran out after {n} sequences (1 epoch of {n}); epoch 2 starts with a "
                        "new shuffle")
    assert row["data/epochs/qa"] == pytest.approx(consumed / n)
    assert row["data/tokens/web"] == row["data/sequences/web"] * SEQ_LEN
    assert row["data/sequences/web"] + consumed == STEPS * G


def test_resume_continues_every_source_exactly_at_another_layout(sources):
    srcs = mixture(sources)
    straight, _ = global_batches(srcs, 1, 16, 80)
    _, first = global_batches(srcs, 2, 8, 40)
    state = json.loads(json.dumps(first.state_dict()))   # what the checkpoint's state.json holds
    assert state["mixture"]["consumed"] == [first.plan.consumed(40)[i] for i in range(2)]
    second, _ = global_batches(srcs, 2, 2, 40, start_state=state)
    for step, ((t0, i0), (t1, i1)) in enumerate(zip(straight[40:], second), start=40):
        assert torch.equal(t0, t1) and torch.equal(i0, i1), f"step {step} differs after resume"
    # a changed mixture, or a single-source loader, does not take the state
    with pytest.raises(DataError, match=r"data.mixture was \[web 0.7, qa 0.3\] when saved, now \[web 0.5, qa 0.5\]"):
        MixtureLoader(mixture(sources, (1, 1)), "train", "pretrain", SEQ_LEN, G, 16, 0, 1, 7).load_state_dict(state)
    with pytest.raises(DataError, match="written by a data.mixture run"):
        PackedLoader(Path(srcs[0].path) / "train", SEQ_LEN, G, 16, 0, 1, 7).load_state_dict(state)


def test_sft_sources_mix(tmp_path, sources):
    rng = random.Random(1)
    for name, n in (("a", 40), ("b", 25)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"prompt": f"{name} {i} " + " ".join(rng.choice(WORDS) for _ in range(4)),
                                    "response": " ".join(rng.choice(WORDS) for _ in range(6))}) + "\n")
        prepare("--out", tmp_path / name, "--format", "sft", "--files", tmp_path / f"{name}.jsonl", "--seq-len", 48,
                "--tokenizer", sources["web"] / "tokenizer.model", "--val-fraction", 0.2)
    srcs = resolve_sources([MixtureEntry(str(tmp_path / "a"), 1), MixtureEntry(str(tmp_path / "b"), 3)])
    assert check_sources(srcs, 1024, 0, 3) == "sft"
    loader = MixtureLoader(srcs, "train", "sft", 48, 8, 4, 0, 1, 5)
    mb = loader.next_micro_batch()
    assert mb.tokens.shape == mb.prompt_mask.shape == (4, 48) and mb.prompt_mask.any(1).all()
    assert set(mb.source_ids.tolist()) == {0, 1}
    loader.close()
    mixed = resolve_sources([MixtureEntry(str(tmp_path / "a"), 1), MixtureEntry(str(sources["qa"]), 1)])
    with pytest.raises(DataError, match="source qa .* holds pretrain data but source a holds sft; pretraining and SFT"):
        check_sources(mixed, 1024, 0, 3)


def test_weights_are_normalized_and_said_so():
    srcs = resolve_sources([MixtureEntry("data/web", 2.0), MixtureEntry("data/qa/", 1.0, name="questions")])
    assert [s.name for s in srcs] == ["web", "questions"]
    assert [s.weight for s in srcs] == pytest.approx([2 / 3, 1 / 3])
    assert normalization_note(srcs) == ("data.mixture weights sum to 3, not 1: normalized to web 0.6667, "
                                        "questions 0.3333")
    assert normalization_note(resolve_sources([MixtureEntry("a", 0.7), MixtureEntry("b", 0.3)])) is None


def test_one_override_and_layered_config_files(tmp_path):
    layer = tmp_path / "layer.yaml"
    layer.write_text("train:\n  max_steps: 7\ndata:\n  mixture:\n    - {path: x, weight: 1}\n")
    cfg = load_config(["configs/tiny.yaml", str(layer)], ())
    assert cfg.train.max_steps == 7 and cfg.train.seq_len == load_config("configs/tiny.yaml").train.seq_len
    assert [(e.path, e.weight) for e in cfg.data.mixture] == [("x", 1.0)]
    cfg = load_config(["configs/tiny.yaml", str(layer)], ("data.mixture=[{path: a, weight: 0.7}, "
                                                          "{path: b, weight: 0.3, name: bee}]",))
    assert [(e.path, e.weight, e.name) for e in cfg.data.mixture] == [("a", 0.7, None), ("b", 0.3, "bee")]


def test_paper_mix_preset_validates_with_local_sources(sources):
    cfg = load_config(["configs/ec_8b_a1b.yaml", "configs/mix_8b_a1b.yaml"])
    assert [(e.name, e.weight) for e in cfg.data.mixture] == [("nemotron_cc_hq", 0.5), ("diverse_qa", 0.5)]
    assert cfg.train.run_name == "mix_8b_a1b" and cfg.model.vocab_size == 32768   # the model preset underneath
    local = (f"data.mixture=[{{path: {sources['web']}, weight: 0.5, name: nemotron_cc_hq}}, "
             f"{{path: {sources['qa']}, weight: 0.5, name: diverse_qa}}]")
    cfg = load_config(["configs/ec_8b_a1b.yaml", "configs/mix_8b_a1b.yaml"], (local, "model.vocab_size=1024"))
    assert check_sources(resolve_sources(cfg.data.mixture), 1024, 0, 3) == "pretrain"


def run_main(run_dir, *args):   # one step into a scratch directory, should a refusal ever let it through
    return subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", "model.vocab_size=1024",
                           "train.max_steps=1", f"train.output_dir={run_dir}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("mix, message", [
    ("[{path: WEB, weight: 0.5}, {path: QA, weight: 0}]",
     "data.mixture[1].weight=0.0 (source qa) must be > 0; drop the source to leave it out"),
    ("[{path: WEB, weight: -1}, {path: QA, weight: 1}]",
     "data.mixture[0].weight=-1.0 (source "),
    ("[{path: WEB, weight: 1}, {path: MISSING, weight: 1}]",
     "data.mixture[1] (source nowhere): MISSING has no prepared train split; run `python -m trainer.data prepare"),
    ("[{path: WEB, weight: 1}, {path: OTHER, weight: 1}]", "data.mixture: source other (OTHER) was prepared with "
     "tokenizer sha256 OTHERSHA but source web with WEBSHA"),
])
def test_refusals_exit_2_with_one_line(sources, tmp_path, mix, message):
    web = tmp_path / "web"
    os.symlink(sources["web"], web)
    paths = {"WEB": str(web), "QA": str(sources["qa"]), "OTHER": str(sources["other"]),
             "MISSING": str(tmp_path / "nowhere")}
    shas = {f"{k}SHA": json.loads((Path(paths[k]) / "meta.json").read_text())["tokenizer_sha256"]
            for k in ("WEB", "OTHER")}
    for key in ("WEBSHA", "OTHERSHA", "WEB", "QA", "OTHER", "MISSING"):
        mix, message = mix.replace(key, {**paths, **shas}[key]), message.replace(key, {**paths, **shas}[key])
    proc = run_main(tmp_path / "run", f"data.mixture={mix}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_benchmark_measures_both_loaders(sources, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "benchmarks/data_mixture.py", "--sources", str(sources["web"]),
                           str(sources["qa"]), "--seq-len", "64", "--global-batch", "16", "--steps", "3",
                           "--repeat", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {r["loader"]: r for r in doc["rows"]}
    assert set(rows) == {"single", "mixture"} and rows["single"]["build_ratio"] == 1.0
    assert rows["mixture"]["micro_batches"] == 3 * 2 and 0 <= rows["mixture"]["data_wait_frac"] < 1
    assert doc["meta"]["cpu_model"] and len(doc["meta"]["loadavg_before"]) == 3


def test_validation_per_source_and_weighted_mean():
    from model import DiffusionTransformer
    from trainer.validation import evaluate, evaluate_sources
    cfg = load_config("configs/tiny.yaml", ("model.vocab_size=64", "model.d_model=32", "model.n_layers=1",
                                            "eval.num_ratio_points=4"))
    torch.manual_seed(0)
    model = DiffusionTransformer(cfg.model_config)
    g = torch.Generator().manual_seed(1)
    batches = {"a": [torch.randint(4, 64, (2, 32), generator=g)], "b": [torch.randint(4, 20, (2, 32), generator=g)]}
    row = evaluate_sources(model, batches, {"a": 0.8, "b": 0.2}, cfg, 0, 1, torch.device("cpu"))
    alone = {name: evaluate(model, b, cfg, 0, 1, torch.device("cpu")) for name, b in batches.items()}
    assert row["val/loss/a"] == alone["a"]["val/loss"] and row["val/loss/b"] == alone["b"]["val/loss"]
    assert row["val/loss/a"] != pytest.approx(row["val/loss/b"], rel=1e-3)
    assert row["val/loss"] == pytest.approx(0.8 * row["val/loss/a"] + 0.2 * row["val/loss/b"], rel=1e-12)
    assert row["val/loss_bin/00"] == pytest.approx(0.8 * alone["a"]["val/loss_bin/00"]
                                                   + 0.2 * alone["b"]["val/loss_bin/00"], rel=1e-12)


def test_train_loss_per_source_groups_the_sequences():
    from model.diffusion import diffusion_loss, mask_tokens
    from trainer.step_stats import loss_by_group
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 50, (6, 16), generator=g)
    masked = mask_tokens(tokens, torch.tensor([0.2, 0.5, 0.9, 0.3, 0.7, 0.4]), torch.rand(6, 16, generator=g), 3)
    logits = torch.randn(int(masked.mask_BL.sum()), 50, generator=g)
    rec = diffusion_loss(logits, tokens, masked)
    groups = torch.tensor([1, 0, 1, 1, 0, 1])
    num, cnt = loss_by_group(rec, groups, 2)
    for i in range(2):   # brute force: each group's sequences alone, the ELBO numerator and token count
        rows = (groups == i).nonzero().squeeze(1)
        want = sum(float(rec.nll_BL[r].sum() / rec.ratio_B[r]) for r in rows.tolist())
        assert float(num[i]) == pytest.approx(want, rel=1e-9) and float(cnt[i]) == 16 * len(rows)
    assert float(num.sum() / cnt.sum()) == pytest.approx(float(rec.elbo), rel=1e-6)
