"""A stored golden loss curve: the tiny preset's first 20 steps on 2 processes (plain env:// ranks
from trainer/launch.py, gloo, ZeRO-2; the stored curve was recorded through the `deepspeed` launcher,
which sets the same variables), train loss at every step and validation loss at steps 0, 10 and 20, so that a
change of numerics fails loudly and names the first step that moved.

The curve is stored in tests/assets/losses/tiny_ec_2proc.txt together with what it was recorded on:
the data's fingerprint (data/default, prepared by `make setup` from the running Python's standard
library, so it differs between Python versions) and the machine (CPU model, torch build). Data with
another fingerprint gives another curve without any change of numerics: the test then skips and says
why; a different CPU may round differently (another SIMD width reorders float sums), which the
failure message points out.

Tolerance: relative 1e-5 per value. The same code on the same machine repeats the curve exactly (CPU
kernels and 2-rank gloo sums are deterministic); reordering one float sum moves step 1 by ~1e-7 and
the difference grows through 20 steps of training, so 1e-5 passes rounding-level noise of a single
reorder and fails anything that changes the math.

Regenerate (only when a numerics change is intended; say so in the commit):

    .venv/bin/python tests/trainer/test_golden_loss.py --write

`--repo DIR` records the curve of another checkout (e.g. a `git worktree` of an older commit, to show
that a restructure changed nothing) and `--out FILE` writes it elsewhere instead of over the asset.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:   # run as a script to regenerate
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from tests.trainer.launch import read_metrics  # noqa: E402
from trainer.launch import ENTRY, start, trainer_args  # noqa: E402

GOLDEN = ROOT / "tests" / "assets" / "losses" / "tiny_ec_2proc.txt"
DATA = ROOT / "data" / "default"
REL_TOL = 1e-5
NPROC = 2
OVERRIDES = {"train.max_steps": 20, "train.log_every": 1, "train.eval_every": 10, "wandb.mode": "disabled"}


def data_fingerprint(data: Path) -> str:
    """What the curve depends on in the prepared data: the tokenizer and the token counts."""
    meta = json.loads((data / "meta.json").read_text())
    splits = {name: split["num_tokens"] for name, split in meta["splits"].items()}
    tok = hashlib.sha256((data / meta["tokenizer"]).read_bytes()).hexdigest()[:16]
    return f"tokenizer_sha256={tok} tokens={json.dumps(splits, sort_keys=True, separators=(',', ':'))}"


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} | torch {torch.__version__}"


def record(repo: Path, data: Path, work: Path, timeout: int = 900) -> dict:
    """Runs `repo`'s trainer (its own main.py, configs and DeepSpeed JSON) on `data`; returns
    {"train": {step: loss}, "val": {step: loss}}."""
    run_dir = work / "run"
    overrides = {**OVERRIDES, "data.path": str(data), "train.output_dir": str(run_dir)}
    args = trainer_args([f"{k}={v}" for k, v in overrides.items()], config=repo / "configs" / "tiny.yaml",
                        ds_config=repo / "ds_configs" / "zero2.json", script=repo / ENTRY)
    # imports come from `repo` alone; plain env:// ranks (the curve does not depend on the launcher)
    run = start(NPROC, args, launcher="env", env={"PYTHONPATH": None})
    try:
        rc = run.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"trainer did not end within {timeout} s:\n{run.text()[-4000:]}") from None
    if rc != 0:
        raise AssertionError(f"trainer failed ({rc}):\n{run.text()[-8000:]}")
    rows = read_metrics(run_dir)
    return {"train": {r["step"]: r["train/loss"] for r in rows if "train/loss" in r},
            "val": {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}}


def write_golden(path: Path, curve: dict, header: dict) -> None:
    lines = [f"# {k}: {v}" for k, v in header.items()]
    lines.append("# kind step loss")
    for kind in ("train", "val"):
        lines += [f"{kind} {step} {loss!r}" for step, loss in sorted(curve[kind].items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def read_golden(path: Path) -> tuple:
    header, curve = {}, {"train": {}, "val": {}}
    for line in path.read_text().splitlines():
        if line.startswith("# ") and ": " in line:
            key, value = line[2:].split(": ", 1)
            header[key] = value
        elif line and not line.startswith("#"):
            kind, step, loss = line.split()
            curve[kind][int(step)] = float(loss)
    return header, curve


def first_moved(expected: dict, got: dict, rel: float):
    """The earliest (step, kind, expected, got, relative difference) outside `rel`, or None.
    Steps are checked in time order, train before the validation at the same step."""
    for step in sorted(set(expected["train"]) | set(expected["val"])):
        for kind in ("train", "val"):
            if step not in expected[kind]:
                continue
            want, have = expected[kind][step], got[kind].get(step)
            if have is None or not math.isclose(have, want, rel_tol=rel, abs_tol=0.0):
                diff = None if have is None else abs(have - want) / abs(want)
                return step, kind, want, have, diff
    return None


def max_rel_diff(a: dict, b: dict) -> float:
    return max(abs(a[k][s] - b[k][s]) / abs(a[k][s]) for k in ("train", "val") for s in a[k])


def test_comparison_names_the_first_step_that_moved():
    """The check itself, on the stored curve: a change under the tolerance passes; over it, the
    earliest step is named even when later ones moved more; a missing step counts as moved."""
    _, expected = read_golden(GOLDEN)
    got = {kind: dict(curve) for kind, curve in expected.items()}
    got["train"][3] *= 1 + 0.5 * REL_TOL
    assert first_moved(expected, got, REL_TOL) is None
    got["val"][10] *= 1 + 3 * REL_TOL
    got["train"][17] *= 1.01
    step, kind, want, have, diff = first_moved(expected, got, REL_TOL)
    assert (step, kind, want) == (10, "val", expected["val"][10]) and diff == pytest.approx(3 * REL_TOL)
    del got["train"][2]
    assert first_moved(expected, got, REL_TOL)[:2] == (2, "train")


@pytest.mark.slow
def test_tiny_preset_reproduces_golden_loss_curve(tmp_path):
    if not (DATA / "meta.json").exists():
        pytest.skip(f"{DATA} is not prepared; run `make setup`")
    header, expected = read_golden(GOLDEN)
    assert sorted(expected["train"]) == list(range(1, 21)) and sorted(expected["val"]) == [0, 10, 20]
    fingerprint = data_fingerprint(DATA)
    if fingerprint != header["data"]:
        pytest.skip(f"data/default differs from the data the golden curve was recorded on "
                    f"({fingerprint} vs {header['data']}): regenerate with "
                    f"`python tests/trainer/test_golden_loss.py --write` if this is the reference machine")
    got = record(ROOT, DATA, tmp_path)
    moved = first_moved(expected, got, REL_TOL)
    if moved:
        step, kind, want, have, diff = moved
        here = machine()
        note = "" if here == header["machine"] else f" (recorded on {header['machine']}, running on {here})"
        pytest.fail(f"golden loss moved first at step {step} ({kind} loss): expected {want!r}, got {have!r}, "
                    f"relative difference {diff} > {REL_TOL}{note}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Record the tiny preset's golden loss curve (2 processes, 20 steps).")
    p.add_argument("--write", action="store_true", help=f"write to {GOLDEN.relative_to(ROOT)}")
    p.add_argument("--out", type=Path, help="write here instead")
    p.add_argument("--repo", type=Path, default=ROOT, help="checkout whose trainer to run (default: this one)")
    p.add_argument("--data", type=Path, default=DATA, help="prepared data directory (default: data/default)")
    args = p.parse_args(argv)
    out = args.out or (GOLDEN if args.write else None)
    if out is None:
        p.error("--write or --out FILE is required")
    repo = args.repo.resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as work:
        curve = record(repo, args.data.resolve(), Path(work))
    header = {"what": f"configs/tiny.yaml on {NPROC} processes (deepspeed launcher, gloo, ds_configs/zero2.json)",
              "overrides": " ".join(f"{k}={v}" for k, v in OVERRIDES.items()),
              "data": data_fingerprint(args.data.resolve()), "machine": machine(), "commit": commit,
              "tolerance": f"relative {REL_TOL}",
              "regenerate": "python tests/trainer/test_golden_loss.py --write"}
    write_golden(out, curve, header)
    print(f"wrote {out}: {len(curve['train'])} train steps, val at {sorted(curve['val'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
