"""Bad input (issue 13, item 5): one line naming the problem, exit 2, on every rank, before any
process group or engine exists (DeepSpeed logs "Initializing TorchBackend" when it starts one)."""
import shutil

import pytest

from model.config import ConfigError
from tests.faults.faultrun import Run, first_error_line, overrides
from rundir.config import load_config, parse_value

GROUP_STARTED = "Initializing TorchBackend"


@pytest.mark.parametrize("raw, value", [("3e-4", 3e-4), ("1e8", 1e8), ("1.0e+8", 1e8), ("-2E3", -2000.0),
                                        (".5", 0.5), ("5", 5), ("true", True), ("null", None), ("abc", "abc"),
                                        ("[1, 2]", [1, 2]), ("", "")])
def test_overrides_read_numbers_as_numbers(raw, value):
    got = parse_value(raw)
    assert got == value and type(got) is type(value)


def test_lr_in_exponent_notation_is_accepted():
    assert load_config("configs/tiny.yaml", ("optim.lr=3e-4",)).optim.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="optim"):
        load_config("configs/tiny.yaml", ("optim.lr=-1e-3",))


def _refused(run: Run, nproc: int, *names) -> str:
    rc, text = run.finish(timeout=300), run.text()
    assert rc == 2, text[-3000:]
    line = first_error_line(text)
    assert line.startswith("error: ") and all(n in line for n in names), line
    assert "Traceback" not in text and GROUP_STARTED not in text, text[-3000:]
    assert sum(ln.startswith("error: ") for ln in text.splitlines()) == nproc, "every rank says it"
    return line


@pytest.fixture
def corpus_copy(small_corpus, tmp_path):
    return shutil.copytree(small_corpus, tmp_path / "data")


def test_corrupt_meta_json(corpus_copy, tmp_path):
    (corpus_copy / "train" / "meta.json").write_text('{"format_version": 1, "shards": [')
    _refused(Run.env(2, overrides(corpus_copy, tmp_path / "run")), 2, "train/meta.json", "not valid JSON")


def test_short_shard(corpus_copy, tmp_path):
    shard = corpus_copy / "train" / "shard_00000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    _refused(Run.env(2, overrides(corpus_copy, tmp_path / "run")), 2, "shard_00000.bin", "bytes")


def test_missing_resume_target_is_refused_on_every_rank(small_corpus, tmp_path):
    missing = tmp_path / "nonexistent"
    _refused(Run.env(2, overrides(small_corpus, tmp_path / "run", **{"train.resume": missing})), 2,
             f"train.resume={missing}")
