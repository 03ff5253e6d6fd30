"""End-to-end training throughput of EC vs TC vs dense, through the real trainer on 2 processes.

    python benchmarks/train_throughput.py [--preset ffn|fine|tiny] [--ep 2] [--steps 30] [--warmup 10]
        [--window 5] [--impls ec ec_dynamic tc_cf1 tc_dropless dense] [--rounds 1] [--json out.json]
    python benchmarks/train_throughput.py --profile [--preset ffn]     # no launcher

Each implementation (benchmarks/throughput/presets.py: ec, ec_dynamic, tc_cf1, tc_dropless, dense)
is one `deepspeed --num_gpus N train.py` run (gloo on the CPU, ZeRO-2, fp32, moe.ep_size = N
by default: each rank holds 1/N of the experts) of the same preset, data and diffusion noise, for
`warmup + steps` optimizer steps.

The trainer logs `perf/step_s` (mean step time over a window of `--window` steps, averaged over
ranks) and `perf/rank_spread_s` (max - min over ranks of that mean). The first `--warmup` steps
(whole windows) are discarded; the headline step time is the median over the remaining windows
(of all rounds), tokens/s = global tokens per step / that, and rank spread the median window
spread. Step time excludes evaluation and checkpointing (the trainer times the optimizer step
only). Each rank runs with OMP_NUM_THREADS=--threads (default: cores / processes, so the ranks
do not oversubscribe the CPU). Other processes' CPU use during each run is measured and printed;
results from a busy machine are flagged, not hidden. The machine (CPU model, ISA flags, cores,
torch build) is printed above the tables and recorded in the JSON.

`--profile` answers "where does the time go" for the same shapes: `modules` in one process (a full
training step per implementation, the FFN sublayers alone and the MoE layer's hottest operators;
benchmarks/throughput/profile_modules.py), `engine` the trainer's own set-up and train step in
--nproc processes with forward, backward and engine.step timed apart
(benchmarks/throughput/profile_engine.py), `all` both.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):   # run as a script: make the repository root importable
    sys.path.insert(0, str(ROOT))

from benchmarks.throughput.presets import DEFAULT_IMPLS, IMPLS, PRESETS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="ffn",
                   help="overrides on top of --config (default ffn: tiny with d_model and h_e doubled)")
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--ds-config", dest="ds_config", default="ds_configs/zero2.json")
    p.add_argument("--data", default="data/default")
    p.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS), choices=IMPLS)
    p.add_argument("--compile", choices=("eager", "compiled", "both"), default="eager",
                   help="each implementation eager, with train.compile=true (as <impl>/compiled), or both")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="optimizer steps discarded (whole windows)")
    p.add_argument("--window", type=int, default=5, help="steps per logged window (train.log_every)")
    p.add_argument("--rounds", type=int, default=1, help="runs per implementation, interleaved")
    p.add_argument("--max-rounds", type=int, default=3,
                   help="rerun implementations with fewer than --min-clean clean windows, up to this many rounds")
    p.add_argument("--min-clean", type=int, default=3, help="clean windows wanted per implementation")
    p.add_argument("--max-foreign", type=float, default=0.25, metavar="CORES",
                   help="a window during which other processes used more CPU than this is not clean")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--ep", type=int, help="moe.ep_size (default --nproc: every rank holds 1/nproc of the "
                                          "experts, the expert-parallel layout; 1 replicates them)")
    p.add_argument("--threads", type=int, default=max((os.cpu_count() or 2) // 2, 1),
                   help="OMP threads per rank (default: cores / 2)")
    p.add_argument("--override", nargs="*", default=[], help="extra dotted key=value for every run")
    p.add_argument("--keep", metavar="DIR", help="keep run directories under DIR (default: a temp dir)")
    p.add_argument("--wait-idle", type=float, default=60.0, metavar="S",
                   help="before each run, wait up to S seconds for other processes to leave the CPU (0: don't)")
    p.add_argument("--json", help="write rows {impl, tokens_per_s, step_s, rank_spread, ...} here")
    p.add_argument("--profile", nargs="?", const="all", choices=("all", "modules", "engine"),
                   help="breakdown instead of the runs: the model's modules in one process (no DeepSpeed), "
                        "the trainer's engine and train step in --nproc processes, or both (default)")
    p.add_argument("--profile-warmup", type=int, default=3)
    p.add_argument("--profile-repeat", type=int, default=10)
    p.add_argument("--profile-ops", type=int, default=15)
    p.add_argument("--profile-shapes", action="store_true", help="engine profile: one row per operator and input shapes")
    args = p.parse_args(argv)
    if args.warmup % args.window or args.steps % args.window or args.steps < args.window:
        p.error("--warmup and --steps must be multiples of --window (and --steps >= --window)")
    args.ep = args.ep or args.nproc
    # cores our ranks leave free may be used by others without disturbing the measurement
    args.max_foreign += max((os.cpu_count() or 1) - args.nproc * args.threads, 0)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    impls = list(dict.fromkeys(args.impls))
    impls = {"eager": impls, "compiled": [f"{i}/compiled" for i in impls],
             "both": impls + [f"{i}/compiled" for i in impls]}[args.compile]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the clean-up (finally) on SIGTERM too

    import torch

    from benchmarks.common import machine_info
    from benchmarks.throughput import report
    from benchmarks.throughput.code_state import code_state, snapshot_code

    torch.set_num_threads(args.threads)   # what each rank uses, so the machine line says so
    machine = machine_info(torch.device("cpu"), torch.float32)
    code = code_state()
    args.code_dir = str(ROOT)
    if not args.profile:   # the runs execute a snapshot of the code, taken now
        args.base = args.keep or tempfile.mkdtemp(prefix="train_throughput_")
        args.code_dir = os.path.join(args.base, "code")
        shutil.rmtree(args.code_dir, ignore_errors=True)
        code["model_sha"] = snapshot_code(args.code_dir)
    try:
        report.print_setup(args, impls, code, machine)
        if args.profile:
            from benchmarks.throughput.profile_engine import profile_engine
            from benchmarks.throughput.profile_modules import profile_modules
            rows = profile_modules(args, impls) if args.profile in ("all", "modules") else []
            rows += profile_engine(args, impls) if args.profile in ("all", "engine") else []
            if args.json:
                report.write_profile_json(args, code, machine, rows)
            return
        from benchmarks.throughput.runs import run_all
        print(f"{args.nproc} processes x {args.threads} thread(s), moe.ep_size={args.ep}, {args.ds_config}, gloo; "
              f"{args.warmup} warm-up + {args.steps} timed steps per run, windows of {args.window}, "
              f"{args.rounds} round(s)", flush=True)
        rows = run_all(args, impls)
        targets = report.print_runs(args, rows, code)
        if args.json:
            report.write_runs_json(args, impls, code, machine, rows, targets)
    finally:
        if not args.profile and not args.keep:
            shutil.rmtree(args.base, ignore_errors=True)


if __name__ == "__main__":
    main()
