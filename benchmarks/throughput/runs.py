"""The multi-process measurement: one `deepspeed --num_gpus N train.py` run per
implementation and round, watched by RunMonitor; the trainer's own logged windows
(`perf/step_s`, `perf/rank_spread_s`) after the warm-up are the samples, and a window during which
other processes used more than --max-foreign cores does not count."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks.common import RunMonitor, wait_for_idle
from benchmarks.throughput.presets import common_overrides, describe, impl_overrides, in_code, load_run_config
from trainer.launch import start, trainer_args


def launch(args, impl: str, run_dir: str) -> tuple[float, float, dict]:
    """One training run; returns (wall seconds, other processes' mean CPU use in cores, and that
    use per logged window, keyed by step)."""
    cfg = load_run_config(args, impl, run_dir)
    overrides = common_overrides(args, run_dir) + impl_overrides(impl, cfg)
    trainer = trainer_args(overrides, config=in_code(args, args.config), ds_config=in_code(args, args.ds_config))
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "launcher.log")
    open(log_path, "w").close()
    t0 = time.perf_counter()
    # the `deepspeed` launcher in its own session (trainer/launch.py), so that an interrupted
    # benchmark can stop the launcher and both ranks
    run = start(args.nproc, trainer, launcher="deepspeed", env=env, log=log_path, cwd=args.code_dir)
    monitor = RunMonitor(run.pid, os.path.join(run_dir, "metrics.jsonl"))
    monitor.start()
    try:
        rc = run.wait()
    finally:
        monitor.stop()
        if run.poll() is None:
            stop_group(run.proc)
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = Path(log_path).read_text()[-4000:]
        raise RuntimeError(f"{impl}: trainer exited with {rc}; log {log_path}:\n{tail}")
    return wall, monitor.run_foreign_cores(), monitor.window_foreign_cores()


def stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def wait_until_idle(max_wait_s: float) -> float:
    """wait_for_idle, then a random pause and a second look: two benchmarks that both wait for an
    idle machine would otherwise see it in the same instant and start together, spoiling both."""
    t0 = time.perf_counter()
    waited = wait_for_idle(max_wait_s)
    if waited < max_wait_s:
        time.sleep(random.uniform(0.0, 4.0))
        wait_for_idle(max(max_wait_s - (time.perf_counter() - t0), 0.0))
    return time.perf_counter() - t0


def read_windows(run_dir: str, warmup: int, foreign: dict) -> list[dict]:
    """The logged training windows that end after the warm-up steps, each with the CPU that other
    processes used during it (`foreign_cores`)."""
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("perf/step_s") is not None and r["step"] > warmup:
                rows.append({**r, "foreign_cores": foreign.get(r["step"], 0.0)})
    return rows


def clean(windows: list[dict], max_foreign: float) -> list[dict]:
    return [w for w in windows if w["foreign_cores"] <= max_foreign]


def summarize(impl: str, windows: list[dict], runs: list[dict], tokens_per_step: int, args, meta: dict) -> dict:
    """Medians over the clean windows (other processes under --max-foreign cores), or over all
    windows when fewer than --min-clean are clean (then flagged `noisy`)."""
    good = clean(windows, args.max_foreign)
    noisy = len(good) < max(args.min_clean, 1)   # no clean window at all: every window counts
    use = windows if noisy else good
    step = [w["perf/step_s"] for w in use]
    spread = [w["perf/rank_spread_s"] for w in use]
    step_s = statistics.median(step)
    drops = [[v for k, v in w.items() if k.startswith("moe/drop_frac/")] for w in use]
    return {"impl": impl, "tokens_per_s": tokens_per_step / step_s, "step_s": step_s,
            "rank_spread": statistics.median(spread), "rank_spread_max": max(spread),
            "step_s_mean": statistics.fmean(step), "step_s_min": min(step), "step_s_max": max(step),
            "windows": len(use), "windows_total": len(windows), "noisy": noisy,
            "window_step_s": [w["perf/step_s"] for w in windows],
            "window_foreign_cores": [round(w["foreign_cores"], 3) for w in windows],
            "foreign_cores": max(w["foreign_cores"] for w in use),
            "tflops_per_device": statistics.median(w["perf/tflops_per_device"] for w in use),
            "mean_k": statistics.fmean(w["moe/mean_k"] for w in use),
            "drop_frac": statistics.fmean(statistics.fmean(d) if d else 0.0 for d in drops),
            "final_loss": windows[-1]["train/loss"], "runs": len(runs),
            "wall_s": sum(r["wall_s"] for r in runs), "waited_s": sum(r["waited_s"] for r in runs),
            **meta}


def run_all(args, impls) -> list[dict]:
    """`--rounds` rounds over all implementations (order rotated each round), then extra rounds,
    up to `--max-rounds`, for implementations with fewer than `--min-clean` clean windows."""
    windows = {i: [] for i in impls}
    runs = {i: [] for i in impls}
    for r in range(max(args.max_rounds, args.rounds)):
        todo = impls if r < args.rounds else [
            i for i in impls if len(clean(windows[i], args.max_foreign)) < args.min_clean]
        if not todo:
            break
        order = todo[r % len(todo):] + todo[:r % len(todo)]   # rotate: drift hits all alike
        for impl in order:
            run_dir = os.path.join(args.base, f"{impl.replace('/', '_')}_r{r}")
            shutil.rmtree(run_dir, ignore_errors=True)
            waited = wait_until_idle(args.wait_idle) if args.wait_idle > 0 else 0.0
            wall, foreign, per_window = launch(args, impl, run_dir)
            w = read_windows(run_dir, args.warmup, per_window)
            windows[impl] += w
            runs[impl].append({"wall_s": wall, "foreign_cores": foreign, "waited_s": waited})
            ms = " ".join(f"{x['perf/step_s'] * 1e3:.0f}" + ("*" if x["foreign_cores"] > args.max_foreign else "")
                          for x in w)
            print(f"  round {r} {impl:<12} windows ms/step: {ms}  (wall {wall:5.1f} s, "
                  f"other processes {foreign:.2f} cores, waited {waited:.0f} s for idle)", flush=True)
    cfg = load_run_config(args, impls[0])
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    counts = {d["impl"]: d for d in describe(args, impls)}
    rows = [summarize(i, windows[i], runs[i], tokens_per_step, args,
                      {"active_params": counts[i]["active"], "total_params": counts[i]["total"]})
            for i in impls]
    return add_ratios(rows)


def add_ratios(rows: list[dict]) -> list[dict]:
    """speedup_vs_tc_dropless and step_vs_dense of every row: compiled rows against the compiled
    references, eager rows against the eager ones (None where that reference did not run)."""
    ref = {r["impl"]: r for r in rows}
    for r in rows:
        mode = "/compiled" if r["impl"].endswith("/compiled") else ""
        tc, dense = ref.get("tc_dropless" + mode), ref.get("dense" + mode)
        r["speedup_vs_tc_dropless"] = r["tokens_per_s"] / tc["tokens_per_s"] if tc else None
        r["step_vs_dense"] = r["step_s"] / dense["step_s"] if dense else None
    return rows
