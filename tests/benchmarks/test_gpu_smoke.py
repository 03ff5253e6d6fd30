"""benchmarks/gpu.sh --cpu-smoke: the GPU measurement's own code at toy shapes on the CPU, so the
script a lent GPU runs cannot rot between loans; and the guards that keep its one run from being
lost (a part or config that raises, runs past its time, or is hard-stopped). Checks what it
wrote, never how fast."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_guard
from benchmarks.gpu_guard import Sink, limited

ROOT = Path(__file__).resolve().parents[2]
GPU_PARTS = ("ceilings", "check", "layer", "router", "step", "compile", "graph")


def gpu_sh(args, tmp_path, env=None, timeout=1800):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", "benchmarks/gpu.sh", "--cpu-smoke", "--out", str(tmp_path), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def table_of(stdout: str) -> str:
    """The printed table: from its header line to the end of the output."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("part ") and "case" in line)
    return "\n".join(lines[start:])


@pytest.mark.slow
def test_gpu_script_runs_every_part_on_the_cpu(tmp_path):
    proc = gpu_sh(["--smoke-deepspeed"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    every = json.loads((tmp_path / "gpu_all.json").read_text())
    assert every["meta"]["cpu_model"] and every["meta"]["cpu_smoke"] is True
    status = every["status"]
    for part in GPU_PARTS + ("engine",):
        assert status[part]["state"] == "done", (part, status[part])
        assert (tmp_path / f"gpu_{part}.json").exists()
    assert status["decode"]["state"] in ("done", "skipped"), status["decode"]

    checks = every["check"]
    assert all(r["ok"] for r in checks), [r for r in checks if not r["ok"]]
    names = {r["check"].split("/")[0] for r in checks}
    assert names == {"routing", "layer_bfloat16", "grouped_mm"}
    for r in checks:   # bf16 differs from fp32, but not by nothing: the comparison really ran
        if r["check"].startswith("layer_"):
            assert 1e-4 < r["error"] < 1e-2, r
        if r["check"].startswith("routing/"):
            assert r["compared_fraction"] >= 0.9 and r["mismatched_pairs"] == 0, r

    layers = every["layer"]
    for shape in ("owt", "8b_a1b"):
        impls = {r["impl"]: r for r in layers if r["shape"] == shape}
        assert set(impls) == {"ec_static", "ec_linear_reverse", "tc_cf1", "tc_dropless", "dense"}
        assert all(r["ms"] > 0 and r["tflop_per_s"] > 0 and r["calls_per_sample"] == 2 for r in impls.values())
        # EC static computes exactly k slots per token; TC cf 1.0 at least as many (padding)
        assert impls["ec_static"]["mean_k"] == impls["dense"]["mean_k"] == impls["ec_static"]["k"]
        assert impls["tc_cf1"]["mean_k"] >= impls["ec_static"]["k"]

    router = {r["precision"]: r for r in every["router"]}
    assert set(router) == {"fp32", "tf32", "bf16"}
    for r in router.values():
        assert r["matmul_ms"] > 0 and r["route_ms"] > 0 and r["tflop_per_s"] > 0 and r["ratio_to_dense"] > 0, r

    steps = {r["config"]: r for r in every["step"]}
    assert set(steps) == {"owt_ec", "owt_tc"}
    for r in steps.values():
        assert r["tokens_per_s"] > 0 and r["tflop_per_step"] > 0
        assert r["sdpa_flash"], r["sdpa_kernels"]   # the CPU's flash kernel, as the GPU's
    # linear_reverse EC reads its capacities once per forward, for every MoE layer at once (the
    # model hands them to each block); TC routes with fixed shapes
    assert steps["owt_ec"]["moe_layers"] > 1 and steps["owt_ec"]["counted_syncs_in_moe_layers"] == 1

    compiled = {r["config"]: r for r in every["compile"]}
    assert set(compiled) == {"owt_ec", "owt_tc"}
    for r in compiled.values():
        assert r["stage"] == "done" and "error" not in r and "cut" not in r, r
        assert r["eager_tokens_per_s"] > 0 and r["compiled_tokens_per_s"] > 0 and r["compiled_tflop_per_s"] > 0
        assert r["eager_tflop_per_step"] == pytest.approx(r["compiled_tflop_per_step"], rel=0.5)
        assert r["unique_graphs"] >= 1 and r["graph_breaks"] >= 0 and r["compile_s"] >= 0

    graph = {r["config"]: r for r in every["graph"]}
    tc = graph["owt_tc dropless"]
    assert tc["graph"] == "not capturable" and "data-dependent" in tc["reason"]
    ec = graph["owt_ec static"]
    assert ec["eager_ms"] > 0 and isinstance(ec["counted_syncs"], int) and ec["graph"].startswith("not captured")
    assert ec["sync_free"] in (True, "sync_free option unavailable")

    # the same presets through the real DeepSpeed engine (ZeRO-2), where DeepSpeed imports
    engine = {r["config"]: r for r in every["engine"]}
    assert set(engine) == {"owt_ec", "owt_tc"}
    assert all(r["tokens_per_s"] > 0 and r["tflop_per_s"] > 0 and r["zero_stage"] == 2 for r in engine.values())

    table = table_of(proc.stdout)
    assert len(table) < 9000 and max(len(line) for line in table.splitlines()) < 320
    for part in GPU_PARTS:
        assert any(line.startswith(part) for line in table.splitlines()), part
    written = (tmp_path / "gpu_table.txt").read_text().splitlines()
    printed = [line for line in table.splitlines() if not line.startswith(("parts:", "wrote", "FAILED"))]
    assert printed == written[1:], (printed, written)   # the file: the machine line, then the same table
    assert "wrote" in proc.stdout.splitlines()[-1]


@pytest.mark.slow
def test_the_hard_stop_still_writes_gpu_all_and_the_table(tmp_path):
    """gpu.sh's timeout sends SIGINT mid-run: the run writes gpu_all.json (the stopped part
    marked, the parts after it listed as not started) and prints the table before it exits."""
    # startup and check take about 6 s on an idle machine, compile under inductor 9 s or more (far
    # more with a cold cache): a 14 s hard stop lands inside compile (or earlier, on a loaded
    # machine), with engine still to come. One compile thread: nothing runs outside this process.
    proc = gpu_sh(["--budget", "1000", "--smoke-deepspeed", "--compile-backend", "inductor",
                   "--parts", "check", "layer", "compile", "engine"],
                  tmp_path, env={"GPU_HARD_STOP_S": "14", "TORCHINDUCTOR_COMPILE_THREADS": "1"}, timeout=300)
    assert proc.returncode == 124, proc.stdout[-3000:] + proc.stderr[-3000:]   # timeout's: it was stopped
    every = json.loads((tmp_path / "gpu_all.json").read_text())
    states = {p: s["state"] for p, s in every["status"].items()}
    assert list(states.values()).count("stopped") == 1, states
    stopped = next(p for p, s in states.items() if s == "stopped")
    later = list(states)[list(states).index(stopped) + 1:]
    assert later and all(states[p] == "skipped" for p in later), states
    assert "KeyboardInterrupt" not in proc.stderr
    table = table_of(proc.stdout)
    assert f"{stopped}  " in table and "stopped by the hard stop" in table
    assert proc.stdout.splitlines()[-1].startswith("wrote")


@pytest.mark.slow
def test_a_part_past_its_budget_is_cut_and_the_next_part_runs(tmp_path):
    # 0.6 s: owt_ec's share (0.36 s) ends long before its first compiled step does (a second or
    # more on any machine), owt_tc's before it is built; at 3 s a fast machine finished owt_ec
    proc = gpu_sh(["--parts", "compile", "graph", "--part-budget", "compile=0.6"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    every = json.loads((tmp_path / "gpu_all.json").read_text())
    assert every["status"]["compile"]["state"] == "cut", every["status"]
    rows = every["compile"]   # each preset is cut at its share (or by the part's limit, or before any began)
    assert [r["config"] for r in rows] in (["owt_ec", "owt_tc"], ["owt_ec"], []), rows
    assert all("cut" in r and "compiled_ms" not in r for r in rows), rows
    assert every["status"]["graph"]["state"] == "done"
    assert {r["config"] for r in every["graph"]} == {"owt_ec static", "owt_tc dropless"}


@pytest.mark.slow
def test_the_expert_loop_switch_reaches_the_parts(tmp_path):
    proc = gpu_sh(["--expert-loop", "--parts", "check"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    every = json.loads((tmp_path / "gpu_all.json").read_text())
    assert every["meta"]["expert_loop_forced"] is True
    grouped = [r for r in every["check"] if r["check"].startswith("grouped_mm")]
    assert grouped and all(r.get("skipped") for r in grouped), grouped


# ---- in-process: the guards themselves ---------------------------------------------------------
def smoke_context(**kw):
    from benchmarks.gpu_setup import SMOKE_LAYER_SHAPES, Context
    args = dict(device=torch.device("cpu"), dtype=torch.bfloat16, smoke=True, shapes={"owt": SMOKE_LAYER_SHAPES["owt"]},
                warmup=1, repeat=1, calls=1, step_warmup=1, step_repeat=1, compile_backend="eager")
    return Context(**{**args, **kw})


def test_one_implementation_that_raises_keeps_the_others_rows():
    from benchmarks import gpu_layer
    sink = Sink("layer", None, {})
    gpu_layer.run(smoke_context(), sink, impls=("ec_static", "no_such_router", "dense"))
    rows = {r["impl"]: r for r in sink.rows}
    assert set(rows) == {"ec_static", "no_such_router", "dense"}
    assert "ValueError" in rows["no_such_router"]["error"] and "traceback" in rows["no_such_router"]
    assert rows["ec_static"]["ms"] > 0 and rows["dense"]["ms"] > 0 and rows["ec_static"]["ratio_to_dense"] > 0


def test_a_call_that_raises_while_timed_is_its_own_error():
    from benchmarks.gpu_layer import time_guarded
    a, b = torch.randn(8, 8), torch.randn(7, 8)
    times, errors, _, _ = time_guarded({"fine": lambda: a @ a, "broken": lambda: a @ b}, 1, 2, torch.device("cpu"))
    assert set(times) == {"fine"} and len(times["fine"]) == 2
    assert set(errors) == {"broken"} and isinstance(errors["broken"], RuntimeError)


def test_one_step_preset_that_raises_keeps_the_other():
    from benchmarks import gpu_step
    sink = Sink("step", None, {})
    gpu_step.run(smoke_context(), sink, configs=("no_such_preset", "owt_tc"))
    first, second = sink.rows
    assert first["config"] == "no_such_preset" and "FileNotFoundError" in first["error"]
    assert second["config"] == "owt_tc" and second["tokens_per_s"] > 0 and "counted_syncs_per_step" in second


def up(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.tensor(float("inf")))


def tie_case(k: int = 3, T: int = 64, E: int = 16):
    """Logits where token 0's k-th and k+1-th experts tie exactly, and two copies, one ulp to
    either side, where one or the other wins: both selections are right."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g)
    order = logits[0].argsort(descending=True)
    a, b = order[k - 1], order[k]
    logits[0, b] = logits[0, a]
    one, other = logits.clone(), logits.clone()
    one[0, a], other[0, b] = up(one[0, a]), up(other[0, b])
    return logits, one, other


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_the_token_choice_check_tolerates_exact_ties_but_not_real_differences(capacity_factor):
    from benchmarks.gpu_check import compare_routing, tc_comparable
    from model.moe.routing import token_choice
    k = 3
    logits, one, other = tie_case(k)
    ref = token_choice(one, k, capacity_factor)
    tied = token_choice(other, k, capacity_factor)
    assert (ref.mask != tied.mask).any()   # a bit-exact check would fail here
    decided, gates, ties = tc_comparable(logits, k, ref, capacity_factor)
    result = compare_routing(ref, tied, decided, gates)
    assert result["ok"] and result["mismatched_pairs"] == 0 and ties["tied_tokens"] == 1, (result, ties)

    wrong = one.clone()
    wrong[5, wrong[5].argmax()] -= 10.0   # token 5 really loses its first expert
    result = compare_routing(ref, token_choice(wrong, k, capacity_factor), decided, gates)
    assert not result["ok"] and result["mismatched_pairs"] >= 1


def test_the_expert_choice_check_tolerates_exact_ties_but_not_real_differences():
    from benchmarks.gpu_check import compare_routing, ec_comparable
    from model.moe.routing import expert_choice
    B, L, E, k = 2, 32, 8, 2
    c = L * k // E
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, L, E, generator=g)
    order = logits[1, :, 3].argsort(descending=True)     # expert 3 in sequence 1: its c-th and c+1-th tie
    a, b = order[c - 1], order[c]
    logits[1, b, 3] = logits[1, a, 3]
    one, other = logits.clone(), logits.clone()
    one[1, a, 3], other[1, b, 3] = up(one[1, a, 3]), up(other[1, b, 3])
    ref, tied = expert_choice(one, k), expert_choice(other, k)
    assert (ref.mask != tied.mask).any()
    decided, gates, ties = ec_comparable(logits, k, None)
    assert compare_routing(ref, tied, decided, gates)["ok"] and ties["tied_columns"] == 1

    wrong = one.clone()
    wrong[0, :, 5] = -wrong[0, :, 5]   # expert 5 picks other tokens in sequence 0
    result = compare_routing(ref, expert_choice(wrong, k), decided, gates)
    assert not result["ok"] and result["mismatched_pairs"] > 0


def test_the_table_stays_bounded_with_long_errors_and_many_rows():
    from benchmarks.gpu_table import TABLE_MAX, render, table_rows
    long = "RuntimeError: " + "x" * 5000
    results = {"layer": [{"shape": "owt", "impl": f"impl{i}", "error": long} for i in range(300)],
               "step": [{"config": "owt_ec", "error": long}], "newpart": [{"case": "c" * 500, "note": long}]}
    status = {"compile": {"state": "cut", "why": long}}
    rows = table_rows(results, status, {})
    text = render(rows)
    assert len(text) <= TABLE_MAX and max(len(line) for line in text.splitlines()) < 320
    assert "rows more" in text.splitlines()[-1]
    assert len(render(rows[:5])) < 2000 and "ERROR RuntimeError" in render(rows[:5])


def test_a_limit_cuts_its_block_and_an_outer_limit_passes_through_an_inner_one():
    saved = signal.signal(signal.SIGALRM, gpu_guard._on_alarm)
    try:
        after = []
        with limited(0.2, "block") as lim:
            time.sleep(30)
            after.append("slept")   # never: the limit cut the sleep
        assert lim.cut and not after
        with limited(0.2, "outer") as outer:
            with limited(30, "inner") as inner:
                time.sleep(30)
            after.append("inner ended")   # never: the outer limit's Cut passes the inner block
        assert outer.cut and not inner.cut and not after
        with limited(None, "none") as free:
            pass
        assert not free.cut and free.left() == float("inf")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved)


def test_a_cut_that_something_swallows_is_raised_again():
    """Torch and Python drop some raises (a weakref callback's, a guard's own try inside dynamo):
    the limit raises again until its block has really ended."""
    saved = signal.signal(signal.SIGALRM, gpu_guard._on_alarm)
    try:
        swallowed, after = [], []
        with limited(0.1, "block") as lim:
            try:
                time.sleep(30)
            except gpu_guard.Cut as err:   # what dynamo's guard profiling did to the compile part's cut
                swallowed.append(err.limit)
            time.sleep(30)
            after.append("slept")
        assert swallowed == [lim] and lim.cut and not after
        time.sleep(2 * gpu_guard.RETRY_S)   # the block is over: no Cut arrives late
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved)


def test_a_preset_cut_by_its_own_limit_or_an_outer_one_says_so_in_its_row():
    """limited_row (step and compile presets): its own cut marks the preset's row and the code
    after it runs; an outer limit passing through marks the row too, then goes on up."""
    saved = signal.signal(signal.SIGALRM, gpu_guard._on_alarm)
    try:
        sink = Sink("step", None, {})
        with gpu_guard.limited_row(sink, {"config": "a"}, 0.1, "step a"):
            sink.add({"config": "a", "stage": "timing"})
            time.sleep(30)
        with limited(0.1, "the part") as part:
            with gpu_guard.limited_row(sink, {"config": "b"}, 30, "step b"):
                time.sleep(30)
        a, b = sink.rows
        assert a["cut"].startswith("cut after 0 s (step a)") and a["cut"].endswith("while timing"), a
        assert part.cut and b["config"] == "b" and "(the part)" in b["cut"], b
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved)
