#!/usr/bin/env bash
# The GPU measurement in one command (at most 8 minutes on one H200 or H100):
#     bash benchmarks/gpu.sh [--out DIR] [--budget S] [--parts ceilings check layer step engine]
#     bash benchmarks/gpu.sh --cpu-smoke     # the same code at toy shapes on a CPU (tests run this)
# Needs only torch and the standard library (a lent GPU machine has no DeepSpeed and no network);
# where DeepSpeed imports, its MoE layer joins the layer table and the step also runs through its engine.
# Options and parts: benchmarks/gpu_main.py. JSON goes to --out, default $OUT, else bench_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# the hard cap behind gpu_main.py's own --budget (450 s): whatever finished is already written
exec timeout --signal=INT --kill-after=15 480 "$PY" benchmarks/gpu_main.py "$@"
