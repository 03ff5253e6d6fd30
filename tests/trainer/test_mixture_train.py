"""A data mixture through the real trainer: docs/data.md's two-source example run command by
command, and resume exactness: 2N steps straight equal N steps + a restart at another layout + N
steps, per step, in loss and in every per-source counter. Three small launches (two of one
process, one of two)."""
import json
import random
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import free_port
from tests.trainer.launch import BIN, ROOT, launch, per_step, read_metrics, run_killing_group

N = 3
SOURCES = ("web", "qa")
RUN = {"train.max_steps": 2 * N, "train.schedule_steps": 2 * N, "train.eval_every": N, "train.save_every": N,
       "train.log_every": 1, "train.global_batch_size": 16, "train.micro_batch_size": 8, "eval.batches": 1,
       "wandb.mode": "disabled"}
WORDS = "what is the answer question because therefore data mixture source weight blend epoch".split()


def doc_commands() -> list:
    text = (ROOT / "docs" / "data.md").read_text()
    block = text.split("tests/trainer/test_mixture_train.py -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.strip().splitlines()]


def write_qa(folder: Path) -> None:
    folder.mkdir(parents=True)
    rng = random.Random(0)
    with open(folder / "qa.jsonl", "w") as f:
        for i in range(24):
            pairs = [f"Question {i}.{j}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + "?\nAnswer: "
                     + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) + "." for j in range(4)]
            f.write(json.dumps({"text": "\n".join(pairs)}) + "\n")


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory):
    """docs/data.md's commands, in order, in a scratch directory (data/, qa/ and runs/ there); the
    training command also gets the short-run overrides (RUN) and sees one process."""
    root = tmp_path_factory.mktemp("doc")
    write_qa(root / "qa")
    subst = lambda arg: re.sub(r"(?<![\w/])(data|runs|qa)/", lambda m: f"{root}/{m.group(1)}/", arg)  # noqa: E731
    outputs = []
    for cmd in doc_commands():
        cmd = [subst(a) for a in cmd]
        if cmd[0] == "python":
            cmd[0] = sys.executable
            if "--files" in cmd:   # the shell would expand the glob
                i = cmd.index("--files") + 1
                cmd[i:i + 1] = sorted(str(p) for p in Path(root).glob(cmd[i][len(str(root)) + 1:]))
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        else:
            assert cmd[0] == "deepspeed"
            cmd = [str(BIN / "deepspeed"), "--master_port", str(free_port()), *cmd[1:],
                   *(f"{k}={v}" for k, v in RUN.items())]
            proc = run_killing_group(cmd, 900, env=None)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        outputs.append(proc.stdout + proc.stderr)
    mixture = next(a for a in doc_commands()[2] if a.startswith("data.mixture="))
    return {"root": root, "run": root / "runs" / "mix", "log": outputs[2], "report": outputs[3],
            "mixture": subst(mixture)}


def test_doc_example_runs_and_reports_each_source(doc_run):
    run, log = doc_run["run"], doc_run["log"]
    assert "data.mixture weights sum to 2, not 1: normalized to web 0.5, qa 0.5" in log
    assert re.search(r"data: source qa ran out after \d+ sequences \(1 epoch of \d+\); epoch 2 starts with a "
                     r"new shuffle", log), log[-4000:]
    last = read_metrics(run)
    train = [r for r in last if "train/loss" in r]
    for src in SOURCES:
        assert all(r[f"train/loss/{src}"] > 0 for r in train)
        assert train[-1][f"data/sequences/{src}"] == 2 * N * 8   # 0.5 of 16, every step
        assert train[-1][f"data/tokens/{src}"] == 2 * N * 8 * 128
    assert train[-1]["data/epochs/qa"] > 1
    for row in (r for r in last if "val/loss" in r):   # val/loss: the weighted mean of the sources'
        assert row["val/loss"] == pytest.approx(0.5 * row["val/loss/web"] + 0.5 * row["val/loss/qa"], rel=1e-9)
    assert "sources.png" in (run / "report" / "index.html").read_text()
    assert (run / "report" / "sources.png").stat().st_size > 10_000


def test_resume_at_another_layout_continues_every_source_exactly(doc_run):
    root, straight = doc_run["root"], doc_run["run"]
    base = ["model.vocab_size=1024", doc_run["mixture"], *(f"{k}={v}" for k, v in RUN.items())]
    half = root / "runs" / "half"
    launch(1, [*base, f"train.output_dir={half}", f"train.max_steps={N}", "train.micro_batch_size=16"])
    resumed = root / "runs" / "resumed"
    shutil.copytree(half, resumed)
    proc = launch(2, [*base, f"train.output_dir={resumed}", "moe.ep_size=2", "train.micro_batch_size=4"])
    assert "resharding checkpoint: written at" in proc.stdout + proc.stderr
    keys = ["train/loss", *(f"train/loss/{s}" for s in SOURCES), *(f"data/sequences/{s}" for s in SOURCES),
            *(f"data/epochs/{s}" for s in SOURCES), *(f"val/loss/{s}" for s in SOURCES)]
    for key in keys:
        a, b = per_step(straight, key), per_step(resumed, key)
        assert sorted(a) == sorted(b) and max(a) == 2 * N, key
        for step in a:   # 1e-4: the tolerance of layout independence itself (tests/trainer/test_reshard.py)
            assert b[step] == pytest.approx(a[step], rel=1e-4), f"{key} at step {step}: {b[step]} vs {a[step]}"
