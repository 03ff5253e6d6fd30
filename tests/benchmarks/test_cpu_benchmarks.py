"""The CPU benchmarks run end to end at toy shapes, so their code cannot rot unnoticed: the MoE
layer benchmark with its floor and profile, and the training profile through the real trainer's
engine on 2 gloo processes. Nothing here looks at a time's value, only that each was measured."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(args, timeout):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_moe_layer_benchmark_counts_the_floor_and_profiles(tmp_path):
    out = tmp_path / "layer.json"
    stdout = run(["benchmarks/moe_layer.py", "--batch", "2", "--seq", "32", "--d-model", "32", "--experts", "8",
                  "--k", "2", "--hidden", "16", "--impls", "ec", "tc_dropless", "dense", "--warmup", "0",
                  "--repeat", "1", "--profile", "--profile-ops", "5", "--json", str(out)], timeout=300)
    doc = json.loads(out.read_text())
    rows = {r["impl"]: r for r in doc["rows"]}
    assert set(rows) == {"ec", "tc_dropless", "dense", "floor (dense + movement)"}
    floor = rows["floor (dense + movement)"]
    slots = 2 * 32 * 2   # T x k: EC's capacity is exactly the tokens' k each
    # 2 passes (forward, backward) x (gather + scatter) x (read + write) of each slot's row of 32 floats
    assert floor["moved_bytes"] == 2 * 2 * 2 * slots * 32 * 4
    assert floor["movement_ms"] > 0 and floor["ms"] > rows["dense"]["ms"]
    assert rows["ec"]["ratio_to_floor"] == rows["ec"]["ms"] / floor["ms"]
    for impl in ("ec", "dense"):
        kinds = rows[impl]["profile"]["by_kind_ms"]
        assert kinds.get("matmul", 0) > 0, kinds
    assert "gather/scatter" in rows["ec"]["profile"]["by_kind_ms"]
    assert "profile" not in rows["tc_dropless"]
    assert "floor = dense + movement" in stdout and doc["meta"]["cpu_model"] and "isa" in doc["meta"]


def test_training_profile_runs_the_trainers_engine(tmp_path):
    stdout = run(["benchmarks/train_throughput.py", "--profile", "engine", "--preset", "tiny", "--impls", "ec",
                  "--profile-warmup", "0", "--profile-repeat", "1", "--profile-ops", "3"], timeout=600)
    table = stdout[stdout.index("train_step ms"):]
    row = next(line for line in table.splitlines() if line.startswith("ec "))
    assert len(row.split()) >= 9, row   # forward, backward, engine.step, rest, total, spread, params, load
    assert "hottest operators of 3 whole steps" in stdout


def test_moe_layer_benchmark_times_eager_and_compiled_side_by_side(tmp_path):
    """--compile both: every layer of ours and the dense floor twice, the compiled rows' ratios to
    the compiled dense layer. aot_eager here (the wiring, not inductor's minutes of codegen)."""
    out = tmp_path / "layer.json"
    run(["benchmarks/moe_layer.py", "--batch", "2", "--seq", "32", "--d-model", "32", "--experts", "8", "--k", "2",
         "--hidden", "16", "--impls", "ec", "dense", "--compile", "both", "--compile-backend", "aot_eager",
         "--warmup", "1", "--repeat", "1", "--json", str(out)], timeout=600)
    doc = json.loads(out.read_text())
    rows = {r["impl"]: r for r in doc["rows"]}
    assert {"ec", "dense", "ec/compiled", "dense/compiled"} <= set(rows)
    assert rows["ec/compiled"]["ratio_to_dense"] == rows["ec/compiled"]["ms"] / rows["dense/compiled"]["ms"]
    assert rows["ec"]["ratio_to_dense"] == rows["ec"]["ms"] / rows["dense"]["ms"]
    assert doc["meta"]["compile"] == "both" and len(doc["meta"]["loadavg_start"]) == 3


def test_train_throughput_compiled_implementations_turn_train_compile_on():
    from benchmarks.throughput.presets import impl_overrides
    from rundir.config import load_config
    cfg = load_config("configs/tiny.yaml")
    for impl in ("ec", "tc_dropless", "dense"):
        eager, compiled = impl_overrides(impl, cfg), impl_overrides(f"{impl}/compiled", cfg)
        assert eager[-1] == "train.compile=false" and compiled[:len(eager) - 1] == eager[:-1]
        assert load_config("configs/tiny.yaml", tuple(eager)).train.compile is False
        assert load_config("configs/tiny.yaml", tuple(compiled)).train.compile is True


def test_train_throughput_compares_compiled_with_compiled(capsys, monkeypatch):
    """The targets' ratios: a compiled row against the compiled dense and TC dropless runs, an
    eager row against the eager ones, and the compiled-against-eager EC speedup printed too."""
    import argparse
    from benchmarks.throughput import report
    from benchmarks.throughput.runs import add_ratios
    steps = {"ec": 1.0, "tc_dropless": 1.1, "dense": 0.8, "ec/compiled": 0.9, "tc_dropless/compiled": 1.2,
             "dense/compiled": 0.6}
    rows = add_ratios([{"impl": i, "step_s": s, "tokens_per_s": 1000 / s, "noisy": False} for i, s in steps.items()])
    by = {r["impl"]: r for r in rows}
    assert by["ec"]["step_vs_dense"] == 1.0 / 0.8 and by["ec/compiled"]["step_vs_dense"] == 0.9 / 0.6
    assert abs(by["ec/compiled"]["speedup_vs_tc_dropless"] - 1.2 / 0.9) < 1e-12
    args = argparse.Namespace(window=5, max_foreign=0.25, min_clean=3)
    monkeypatch.setattr(report, "model_sha", lambda: "same")
    targets = report.print_runs(args, rows, {"model_sha": "same"})
    assert targets["ec_vs_dense_step_s_compiled"] == 1.5 and targets["ec_vs_dense_step_s"] == 1.25
    assert abs(targets["ec_compiled_speedup"] - 1.0 / 0.9) < 1e-12
    printed = capsys.readouterr().out
    assert "target ec/compiled step time <= 1.2x dense/compiled: 1.50x -> MISSED" in printed
    assert "ec compiled against eager: 1.11x faster -> met" in printed
