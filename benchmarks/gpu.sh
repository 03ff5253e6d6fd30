#!/usr/bin/env bash
# The GPU measurement in one command (at most 8 minutes on one H200 or H100):
#     bash benchmarks/gpu.sh [--out DIR] [--parts check layer ...] [--part-budget NAME=S] [--expert-loop]
#     bash benchmarks/gpu.sh --cpu-smoke     # the same code at toy shapes on a CPU (tests run this)
# Needs only torch and the standard library (a lent GPU machine has no DeepSpeed and no network);
# where DeepSpeed imports, its MoE layer joins the layer table and the step also runs through its engine.
# Parts, budgets and options: docs/gpu.md and benchmarks/gpu_main.py. JSON goes to --out, default
# $OUT, else bench_out/; gpu_all.json and the table are written whatever happens.
#
# The hard stop: SIGINT at GPU_HARD_STOP_S seconds (480; 1800 with --cpu-smoke, whose CPU may be
# shared), SIGKILL 15 s later. gpu_main.py's own budget ends 25 s before it, and SIGINT makes it
# write gpu_all.json and print the table rather than die.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
HARD="${GPU_HARD_STOP_S:-}"
if [ -z "$HARD" ]; then
    HARD=480
    for arg in "$@"; do
        if [ "$arg" = "--cpu-smoke" ]; then HARD=1800; fi
    done
fi
exec timeout --signal=INT --kill-after=15 "$HARD" "$PY" benchmarks/gpu_main.py --hard-stop "$HARD" "$@"
