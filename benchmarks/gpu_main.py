"""The GPU measurement, run by benchmarks/gpu.sh: checks first, then timings, one table last.

    bash benchmarks/gpu.sh [--out DIR] [--budget S] [--parts ceilings check layer step]
    bash benchmarks/gpu.sh --cpu-smoke       # the same code at toy shapes on the CPU, < 2 min

Parts, in order (each writes DIR/gpu_<part>.json as soon as it is done, so a run cut short
keeps what it finished; DIR defaults to $OUT, else bench_out/):
    ceilings  the measured bf16 matmul rate and device copy bandwidth (the floors' denominators)
    check     benchmarks/gpu_check.py: routing vs CPU, bf16 layer vs fp32, grouped mm vs loop
    layer     benchmarks/gpu_layer.py: one MoE layer at the OWT and 8B-A1B shapes
    step      benchmarks/gpu_step.py: owt_ec and owt_tc training steps at micro-batch 32
A part that would start with less than its usual time left in --budget is skipped and says so.
Exit status 1 when a correctness check failed (timings still run and are written).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):   # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import format_table, machine_info, machine_line
from benchmarks.gpu_setup import LAYER_SHAPES, SMOKE_LAYER_SHAPES, Budget

PARTS = ("ceilings", "check", "layer", "step", "engine")
# seconds a part needs on an H200 (estimates, with margin), to skip rather than be killed mid-way
NEEDS_S = {"ceilings": 10, "check": 60, "layer": 90, "step": 150, "engine": 150}


def table_rows(results: dict) -> list[dict]:
    """Every part's rows as one table: part, case, then whichever numbers the row has."""
    rows = []
    c = results.get("ceilings") or {}
    if c.get("matmul"):
        rows.append({"part": "ceiling", "case": f"matmul {c['matmul_n']}^3", "tflop_per_s": c["matmul"]})
        rows.append({"part": "ceiling", "case": "device copy", "note": f"{c['copy_tb_per_s']:.2f} TB/s"})
    for r in results.get("check") or []:
        rows.append({"part": "check", "case": f"{r['shape']} {r['check']}", "ok": "ok" if r["ok"] else "FAIL",
                     "note": f"err {r['error']:.1e} < {r['bound']:.0e}"})
    for r in results.get("layer") or []:
        if "error" in r:
            rows.append({"part": "layer", "case": f"{r['shape']} {r['impl']}", "note": r["error"][:60]})
            continue
        rows.append({"part": "layer", "case": f"{r['shape']} {r['impl']} B={r['B']}", "ms": r["ms"],
                     "tflop_per_s": r["tflop_per_s"], "ratio_to_dense": r["ratio_to_dense"],
                     "note": f"mean k {r['mean_k']:.2f}"})
    for r in results.get("step") or []:
        if "error" in r:
            rows.append({"part": "step", "case": r["config"], "note": r["error"][:60]})
            continue
        syncs = r.get("cuda_syncs_per_step", r["counted_syncs_per_step"])
        rows.append({"part": "step", "case": f"{r['config']} B={r['B']} L={r['L']}", "ms": r["ms"],
                     "tflop_per_s": r["tflop_per_s"], "mfu": r["mfu_datasheet"], "tokens_per_s": r["tokens_per_s"],
                     "mem_gb": r["peak_mem_gb"], "syncs": syncs,
                     "note": f"flash: {'yes' if r['sdpa_flash'] else 'NO'}; counted syncs {r['counted_syncs_per_step']} "
                             f"({r['counted_syncs_in_moe_layers']} in {r['moe_layers']} MoE layers)"})
    for r in results.get("engine") or []:
        if "error" in r:
            rows.append({"part": "engine", "case": r["config"], "note": r["error"][:60]})
            continue
        rows.append({"part": "engine", "case": f"{r['config']} B={r['B']} L={r['L']}", "ms": r["ms"],
                     "tflop_per_s": r["tflop_per_s"], "mfu": r["mfu_datasheet"], "tokens_per_s": r["tokens_per_s"],
                     "mem_gb": r["peak_mem_gb"], "note": f"DeepSpeed ZeRO-{r['zero_stage']}, {r['precision']}"})
    for part, why in (results.get("skipped") or {}).items():
        rows.append({"part": part, "case": "skipped", "note": why})
    return rows


COLUMNS = [("part", "part", "s"), ("case", "case", "s"), ("ok", "ok", "s"), ("ms", "ms", ".2f"),
           ("tflop_per_s", "TFLOP/s", ".1f"), ("ratio_to_dense", "/dense", ".2f"), ("mfu", "MFU", ".1%"),
           ("tokens_per_s", "tokens/s", ".0f"), ("mem_gb", "peak GB", ".1f"), ("syncs", "syncs/step", "d"),
           ("note", "note", "s")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="toy shapes on the CPU: checks that the script runs")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="JSON goes here ($OUT, else bench_out/)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (parts past it are skipped)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--no-deepspeed", action="store_true",
                   help="leave DeepSpeed's layer and engine step out even where it imports")
    p.add_argument("--smoke-deepspeed", action="store_true",
                   help="with --cpu-smoke: run the DeepSpeed engine step too (toy shapes, gloo)")
    args = p.parse_args(argv)

    from benchmarks import gpu_check, gpu_engine, gpu_layer, gpu_step
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke for the CPU check of this script", file=sys.stderr)
        return 2
    device = torch.device("cpu") if smoke else torch.device("cuda")
    dtype = torch.bfloat16
    shapes = SMOKE_LAYER_SHAPES if smoke else LAYER_SHAPES
    warmup, repeat = (1, 2) if smoke else (3, 10)
    budget = Budget(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**machine_info(device, dtype), "cpu_smoke": smoke, "shapes": shapes}
    print(machine_line(meta), flush=True)
    results: dict = {"skipped": {}}
    importable = gpu_layer.deepspeed_importable() and not args.no_deepspeed
    with_ds = importable and not smoke   # DeepSpeed's layer: its first call costs minutes on a small CPU
    with_engine = importable and (not smoke or args.smoke_deepspeed)
    if not importable:
        results["skipped"]["deepspeed"] = "DeepSpeed does not import here: its layer and engine step left out"
    elif smoke:
        results["skipped"]["deepspeed layer"] = "left out of --cpu-smoke (benchmarks/moe_layer.py times it on CPUs)"
    runners = {
        "ceilings": lambda: gpu_step.ceilings(device, dtype, smoke),
        "check": lambda: gpu_check.run(shapes, device, dtype),
        "layer": lambda: gpu_layer.run(shapes, device, dtype, warmup, repeat, with_ds),
        "step": lambda: gpu_step.run(device, dtype, 2 if not smoke else 1, 5 if not smoke else 2, smoke,
                                     results.get("ceilings") or {}),
        "engine": lambda: gpu_engine.run(device, 2 if not smoke else 1, 5 if not smoke else 2, smoke,
                                         results.get("ceilings") or {}),
    }
    for part in PARTS:
        if part not in args.parts:
            continue
        if part == "engine" and not with_engine:
            results["skipped"].setdefault("engine", "DeepSpeed left out (see above)" if importable
                                          else "DeepSpeed does not import here")
            continue
        if not smoke and budget.left() < NEEDS_S[part]:
            results["skipped"][part] = f"{budget.left():.0f} s left of the budget, {NEEDS_S[part]} s needed"
            continue
        t0 = time.perf_counter()
        print(f"== {part}", flush=True)
        try:
            results[part] = runners[part]()
        except Exception:   # one broken part must not cost the others: record and go on
            results["skipped"][part] = "failed: " + traceback.format_exc(limit=3).strip().splitlines()[-1][:200]
            traceback.print_exc()
            continue
        (out / f"gpu_{part}.json").write_text(json.dumps({"meta": meta, "seconds": time.perf_counter() - t0,
                                                          "rows": results[part]}, indent=2) + "\n")
        print(f"   {time.perf_counter() - t0:.1f} s", flush=True)
    (out / "gpu_all.json").write_text(json.dumps({"meta": meta, **results}, indent=2) + "\n")
    print()
    print(machine_line(meta))
    print(format_table(table_rows(results), COLUMNS))
    print(f"wrote {out}/gpu_*.json")
    checks = results.get("check") or []
    failed = [r["check"] for r in checks if not r["ok"]]
    if failed:
        print(f"FAILED checks: {', '.join(failed)}")
    return 1 if failed or "check" in results["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
