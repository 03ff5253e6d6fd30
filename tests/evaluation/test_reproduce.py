"""evaluation/reproduce.py: the plan, the SLURM sweep it writes, bad input, and a real (minimal)
reproduction through the real trainer whose report is checked against the run directories."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest

from evaluation import reproduce
from tests.trainer.launch import ROOT
from trainer.launch import ENTRY


def cli(*args, timeout=1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evaluation.reproduce", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path):
    runs = tmp_path / "runs"
    proc = cli("--scale", "tiny", "--dry-run", "--arms", "ec_static,tc_dropless,ec_linear_reverse",
               "--runs-dir", runs)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "6 runs: 3 arms x 2 seeds, 240 steps each (983,040 tokens), 1,440 steps in all" in out
    assert "estimated time" in out
    for name in ("ec_static-s1234", "ec_static-s1235", "tc_dropless-s1234", "ec_linear_reverse-s1235"):
        assert f"- {name}:" in out and f"train.output_dir={runs / name}" in out
    tc = next(line for line in out.splitlines() if "tc_dropless-s1234" in line and ENTRY in line)
    for item in ("moe.router=token_choice", "moe.capacity_factor=null", "moe.aux_loss_coef=0.001",
                 "moe.bias_update_rate=0.001", "moe.k=4", "train.seed=1234", "train.max_steps=240"):
        assert item in tc
    # the schedule's k_max is solved once in the plan (E[k] = 4 for linear_reverse 2..6 exactly)
    assert "resolved {'k_min': 2.0, 'k_max': 6.0, 'expected_k': 4.0}" in out
    assert "moe.capacity.flop_match=check" in out
    assert not runs.exists()


def test_paper_scale_writes_the_sweep_and_submits_nothing(tmp_path):
    runs = tmp_path / "paper"
    proc = cli("--scale", "paper", "--arms", "ec_static,tc_dropless", "--runs-dir", runs)
    assert proc.returncode == 0, proc.stderr
    script = (runs / "submit_sweep.sh").read_text()
    assert subprocess.run(["bash", "-n", str(runs / "submit_sweep.sh")]).returncode == 0
    for seed in (1234, 1235):
        assert (f"SWEEP_NAME=repro-s{seed} SWEEP_K=20 SWEEP_K_MIN=8 SWEEP_K_MAX=32 OVERRIDES=\"train.seed={seed}\" "
                "slurm/submit.sh --array=0-6 slurm/capacity_sweep.sh") in script
        assert f"RUN_NAME=repro-s{seed}-bell" in script and f"RUN_NAME=repro-s{seed}-tc_dropless" in script
    assert script.count("slurm/pretrain_ec.sh") == 2 and script.count("slurm/pretrain_tc.sh") == 2
    assert f"--report-only {runs}" in script
    assert sorted(p.name for p in runs.iterdir()) == ["submit_sweep.sh"]


@pytest.mark.parametrize("args,message", [
    (["--scale", "huge"], "--scale='huge' must be one of tiny, small, paper"),
    (["--arms", "ec_static,ec_zigzag"], "--arms: unknown arm 'ec_zigzag'; choose from ec_static, tc_dropless"),
    (["--seeds", "0"], "--seeds=0 must be >= 1"),
    (["--set", "model.vocab_size"], "--set 'model.vocab_size' must look like key=value"),
    (["--report-only", "/nonexistent/runs"], "--report-only /nonexistent/runs: not a directory"),
    (["--arms", "ec_static", "--seeds", "1", "--dry-run", "--set", "moe.k=banana"], "moe.k='banana' must be an integer"),
])
def test_bad_input_is_one_line_and_status_2(args, message, capsys):
    assert reproduce.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_report_only_needs_run_directories(tmp_path, capsys):
    assert reproduce.main(["--report-only", str(tmp_path)]) == 2
    assert "no run directory (with metrics.jsonl)" in capsys.readouterr().err


# ---- a real reproduction, 2 arms x 2 seeds x 4 steps --------------------------------------------------
def final_val(run_dir) -> float:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    return [r["val/loss"] for r in rows if r.get("val/loss") is not None][-1]


def bin_eta(run_dir, b: int) -> float:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    pts = [(r["tokens"], r[f"val/loss_bin/{b:02d}"]) for r in rows if r.get(f"val/loss_bin/{b:02d}") is not None]
    (t0, v0), (t1, v1) = pts[0], pts[-1]
    return -(math.log(v1) - math.log(v0)) / (t1 - t0) * 1e6


@pytest.mark.slow
def test_minimal_reproduction_report_matches_its_runs(small_corpus, tmp_path):
    runs = tmp_path / "runs"
    args = ["--scale", "tiny", "--arms", "ec_static,tc_dropless", "--seeds", 2, "--steps", 4, "--jobs", 2,
            "--runs-dir", runs, "--set", f"data.path={small_corpus}", "--set", "model.vocab_size=1024",
            "--set", "eval.batches=2"]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    names = ["ec_static-s1234", "ec_static-s1235", "tc_dropless-s1234", "tc_dropless-s1235"]
    assert sorted(p.name for p in runs.iterdir() if (p / "metrics.jsonl").exists()) == names
    res = json.loads((runs / "report" / "report.json").read_text())
    md = (runs / "report" / "report.md").read_text()

    # every claim, with the paper's figure, beside a measured result and a verdict
    for key, figure in (("ec_vs_tc", "2x sooner"), ("schedules", "36.5"), ("efficiency", "7-10x")):
        assert figure in res["claims"][key]["paper"] and res["claims"][key]["paper"] in md
        assert res["claims"][key]["measured"]["verdict"]

    # per-seed numbers, read back from the runs themselves
    by = {(r["arm"], r["seed"]): r for r in res["runs"]}
    assert sorted(by) == [("ec_static", 1234), ("ec_static", 1235), ("tc_dropless", 1234), ("tc_dropless", 1235)]
    for (arm, seed), r in by.items():
        assert r["steps"] == 4 and r["final_val_loss"] == pytest.approx(final_val(runs / f"{arm}-s{seed}"))
        assert f"| {arm} | {seed} | 4 |" in md
    assert by[("ec_static", 1234)]["mean_k"] == pytest.approx(4.0)   # EC static applies exactly k = 4

    # spreads computed from those numbers
    sch = res["claims"]["schedules"]["measured"]["val_ppl"]["ec_static"]
    ppl = [math.exp(final_val(runs / f"ec_static-s{s}")) for s in (1234, 1235)]
    assert sch["values"] == pytest.approx(ppl) and sch["std"] == pytest.approx(statistics.stdev(ppl))
    ect = res["claims"]["ec_vs_tc"]["measured"]
    assert [r["seed"] for r in ect["per_seed"]] == [1234, 1235]
    gaps = [final_val(runs / f"tc_dropless-s{s}") - final_val(runs / f"ec_static-s{s}") for s in (1234, 1235)]
    assert ect["val_loss_gap"]["values"] == pytest.approx(gaps)
    assert ect["val_loss_gap"]["std"] == pytest.approx(statistics.stdev(gaps))
    assert all(r["step_speedup"] == r["tc_step"] / r["ec_step"] for r in ect["per_seed"])
    eff = res["claims"]["efficiency"]["measured"]
    for s in (1234, 1235):
        got = eff["per_run"][str(runs / f"ec_static-s{s}")]
        assert got["eta_per_bin"]["0"] == pytest.approx(bin_eta(runs / f"ec_static-s{s}", 0))
        lo, hi = bin_eta(runs / f"ec_static-s{s}", 0), bin_eta(runs / f"ec_static-s{s}", 9)
        assert got["low_over_high"] == (pytest.approx(lo / hi) if hi > 0 else None)
    assert f"(n=2: {ppl[0]:.2f}, {ppl[1]:.2f})" in md
    assert all((runs / "report" / "figures" / f).exists() for f in ("loss.png", "index.html"))

    # the report rebuilt from the run directories alone says the same; a second reproduction
    # finds every run finished and trains nothing
    assert reproduce.main(["--report-only", str(runs), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["claims"] == res["claims"] and again["runs"] == res["runs"]
    proc = cli(*args)
    assert proc.returncode == 0 and all(f"{n}: exit 0 in 0 s" in proc.stdout for n in names)
