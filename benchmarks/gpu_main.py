"""The GPU measurement, run by benchmarks/gpu.sh: checks first, then timings, one table last.

    bash benchmarks/gpu.sh [--out DIR] [--parts ...] [--part-budget NAME=S] [--expert-loop]
    bash benchmarks/gpu.sh --cpu-smoke       # the same code at toy shapes on the CPU

The parts are the PARTS list below, run in its order (most valuable rows first), each under its
own time limit (its budget, and never past the run's): a part past its limit is cut where it is,
keeps the rows it finished, and the next part starts. Every row is written the moment it exists:
DIR/gpu_<part>.json, DIR/gpu_all.json (every part, its status and the machine) and
DIR/gpu_table.txt; DIR defaults to $OUT, else bench_out/. SIGINT or SIGTERM (gpu.sh's hard stop)
ends the run the same way: gpu_all.json and the table are written and printed before it exits.
Budgets, estimates and what each part measures: docs/gpu.md.
Exit status 1 when a correctness check failed (timings still run and are written).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):   # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import gpu_guard
from benchmarks.common import machine_info, machine_line
from benchmarks.gpu_guard import Cut, HardStop, Sink, error_fields, limited, write_json_atomic
from benchmarks.gpu_setup import LAYER_SHAPES, SMOKE_LAYER_SHAPES, Context


@dataclass(frozen=True)
class Part:
    name: str
    target: str          # "module:function"; function(ctx: gpu_setup.Context, sink: gpu_guard.Sink)
    budget_s: float      # its own time limit on a GPU (the run's 455 s hold them all)
    est_s: float         # expected seconds on one H200; a part starts only with half of it left
    needs: str = ""      # "deepspeed": only where DeepSpeed imports


PARTS = [
    Part("ceilings", "benchmarks.gpu_step:ceilings_part", budget_s=15, est_s=5),
    Part("check", "benchmarks.gpu_check:run", budget_s=45, est_s=20),
    Part("layer", "benchmarks.gpu_layer:run", budget_s=50, est_s=25),
    Part("router", "benchmarks.gpu_router:run", budget_s=15, est_s=5),
    Part("step", "benchmarks.gpu_step:run", budget_s=80, est_s=35),
    Part("graph", "benchmarks.gpu_graph:run", budget_s=50, est_s=20),
    # ---- more parts: one line each, here, in the order they should run -------------------------
    # Part(name, "benchmarks.gpu_<name>:run", budget_s=..., est_s=...); run(ctx, sink) adds rows
    # with sink.add(row) (or returns a list of them); an optional table_rows(rows) in the same
    # module shapes its lines of the table. A module not in this checkout is skipped, and says so.
    Part("decode", "benchmarks.gpu_decode:part", budget_s=40, est_s=30),
    # ---------------------------------------------------------------------------------------------
    # compile last of the GPU parts: the longest and least certain (inductor's compile time there)
    Part("compile", "benchmarks.gpu_compile:run", budget_s=180, est_s=120),
    Part("engine", "benchmarks.gpu_engine:run", budget_s=60, est_s=40, needs="deepspeed"),
]
RUN_BUDGET_S = 455        # the whole run's own limit on a GPU; gpu.sh's hard stop is 25 s later
HARD_STOP_MARGIN_S = 25   # seconds between the run's budget and the hard stop: startup and the final write


def resolve(target: str):
    """The part's function and its module; ModuleNotFoundError when the module is not here."""
    module_name, _, fn_name = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, fn_name), module


def parse_budgets(items: list[str]) -> dict:
    names = {p.name for p in PARTS}
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in names or not value:
            raise SystemExit(f"--part-budget {item!r}: expected NAME=SECONDS with NAME one of {', '.join(names)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise SystemExit(f"--part-budget {item!r}: {value!r} is not a number of seconds") from None
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="toy shapes on the CPU: checks that the script runs")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="JSON goes here ($OUT, else bench_out/)")
    p.add_argument("--hard-stop", type=float, default=None,
                   help="seconds after which gpu.sh sends SIGINT (sets the default --budget: 25 s less)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole run (default: --hard-stop less {HARD_STOP_MARGIN_S} s, else "
                        f"{RUN_BUDGET_S} on a GPU, none with --cpu-smoke)")
    p.add_argument("--part-budget", action="append", default=[], metavar="NAME=S",
                   help="a part's own limit in seconds, overriding PARTS (also under --cpu-smoke, which has none)")
    p.add_argument("--parts", nargs="+", default=[pt.name for pt in PARTS], choices=[pt.name for pt in PARTS])
    p.add_argument("--expert-loop", action="store_true", default=os.environ.get("ECDLM_EXPERT_LOOP") == "1",
                   help="ragged experts take the per-expert loop, not torch._grouped_mm (env ECDLM_EXPERT_LOOP=1)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the compile part (default inductor; eager with --cpu-smoke)")
    p.add_argument("--no-deepspeed", action="store_true",
                   help="leave DeepSpeed's layer and engine step out even where it imports")
    p.add_argument("--smoke-deepspeed", action="store_true",
                   help="with --cpu-smoke: run the DeepSpeed engine step too (toy shapes, gloo)")
    args = p.parse_args(argv)
    if args.budget is None and args.hard_stop is not None:
        args.budget = max(args.hard_stop - HARD_STOP_MARGIN_S, 1.0)
    if args.budget is None and not args.cpu_smoke:
        args.budget = RUN_BUDGET_S
    args.part_budgets = parse_budgets(args.part_budget)
    return args


class Run:
    """What the run has so far, and the files it is kept in."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta = out, meta
        self.results: dict = {}       # part -> its rows
        self.status: dict = {}        # part -> {"state": done/skipped/cut/failed/stopped, "why", "seconds"}
        self.formatters: dict = {}    # part -> its module's table_rows, where it has one

    def table(self) -> str:
        from benchmarks.gpu_table import render, table_rows
        return render(table_rows(self.results, self.status, self.formatters))

    def write(self) -> None:
        write_json_atomic(self.out / "gpu_all.json", {"meta": self.meta, "status": self.status, **self.results})
        try:
            text = self.table()
        except Exception as err:   # the JSON above is what matters; the table must not cost it
            text = f"(table failed: {type(err).__name__}: {err})"
        tmp = self.out / "gpu_table.txt.tmp"
        tmp.write_text(machine_line(self.meta) + "\n" + text + "\n")
        os.replace(tmp, self.out / "gpu_table.txt")


def run_part(part: Part, run: Run, ctx_args: dict, budget, whole) -> None:
    """One part under its limit; whatever happens, its status says so and its rows stay."""
    run.status[part.name] = st = {"state": "running", "budget_s": budget}
    t0 = time.perf_counter()
    try:
        fn, module = resolve(part.target)
    except ModuleNotFoundError as err:
        st.update(state="skipped", why=f"{part.target.partition(':')[0]} is not in this checkout ({err})", seconds=0.0)
        return
    if callable(getattr(module, "table_rows", None)):
        run.formatters[part.name] = module.table_rows
    sink = Sink(part.name, run.out, run.meta, on_change=run.write)
    run.results[part.name] = sink.rows
    try:
        with limited(budget, part.name) as lim:
            ctx = Context(**ctx_args, results=dict(run.results), limit=lim)
            try:
                returned = fn(ctx, sink)
                for row in returned or []:
                    if not any(row is r for r in sink.rows):
                        sink.add(row)
                cut = sum(1 for r in sink.rows if r.get("cut"))
                st.update(state="cut", why=f"{cut} of {len(sink.rows)} rows cut at their share of its limit") \
                    if cut else st.update(state="done")
            except Exception as err:   # the part's own failure: its finished rows stay
                import traceback
                traceback.print_exc()
                st.update(state="failed", **error_fields(err))
                st["why"] = "failed: " + st["error"]
        if lim.cut:
            st.update(state="cut", why=f"cut at its own limit, {budget:.0f} s ({len(sink.rows)} rows kept)")
    except Cut:   # the run's limit, inside this part
        st.update(state="cut", why=f"cut: the run's budget ran out ({len(sink.rows)} rows kept)")
        raise
    finally:
        st["seconds"] = round(time.perf_counter() - t0, 1)
        if st["state"] == "running":   # HardStop passing through
            st.update(state="stopped", why=f"stopped by the hard stop ({len(sink.rows)} rows kept)")
        run.write()


def main(argv=None) -> int:
    gpu_guard.install_handlers()
    args = parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke for the CPU check of this script", file=sys.stderr)
        return 2
    device = torch.device("cpu") if smoke else torch.device("cuda")
    dtype = torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.gpu_layer import deepspeed_importable
    importable = deepspeed_importable() and not args.no_deepspeed
    meta = {**machine_info(device, dtype), "cpu_smoke": smoke, "shapes": SMOKE_LAYER_SHAPES if smoke else LAYER_SHAPES,
            "budget_s": args.budget, "hard_stop_s": args.hard_stop, "expert_loop_forced": args.expert_loop,
            "load_average": os.getloadavg(), "deepspeed": importable}
    print(machine_line(meta), flush=True)
    run = Run(out, meta)
    ctx_args = dict(device=device, dtype=dtype, smoke=smoke, shapes=meta["shapes"],
                    warmup=1 if smoke else 3, repeat=2 if smoke else 10, calls=2 if smoke else 5,
                    step_warmup=1 if smoke else 2, step_repeat=2 if smoke else 5,
                    expert_loop=args.expert_loop,
                    compile_backend=args.compile_backend or ("eager" if smoke else "inductor"),
                    with_deepspeed=importable and not smoke)
    loop = contextlib.nullcontext
    if args.expert_loop:
        from model.moe.experts import grouped_mm_disabled as loop
    current = None
    try:
        with limited(args.budget, "the run") as whole:
            for part in PARTS:
                if part.name not in args.parts:
                    continue
                current = part.name
                why = gate(part, args, importable, smoke, whole.left())
                if why:
                    run.status[part.name] = {"state": "skipped", "why": why}
                    run.write()
                    continue
                budget = args.part_budgets.get(part.name, None if smoke else part.budget_s)
                budget = min(budget if budget is not None else float("inf"), whole.left())
                print(f"== {part.name} (limit {budget:.0f} s)", flush=True)
                ceil = (run.results.get("ceilings") or [{}])[0]
                ctx_args["peaks"] = {k: ceil.get(k) for k in ("datasheet", "matmul")}
                with loop():
                    run_part(part, run, ctx_args, budget, whole)
                st = run.status[part.name]
                print(f"   {part.name}: {st['state']}, {st.get('seconds', 0):.1f} s", flush=True)
                gpu_guard.clean_up(device)
                reset_compiler()
        if whole.cut:
            for part in PARTS:
                if part.name in args.parts and part.name not in run.status:
                    run.status[part.name] = {"state": "skipped", "why": "the run's budget ran out before it"}
    except (HardStop, KeyboardInterrupt) as err:
        gpu_guard.quiet()   # first: a stop raised again would cut this handler short
        for st in run.status.values():   # stopped before its own guard began (importing its module)
            if st.get("state") == "running":
                st.update(state="stopped", why="stopped by the hard stop (0 rows kept)")
        for part in PARTS:
            if part.name in args.parts and part.name not in run.status:
                run.status[part.name] = {"state": "skipped", "why": f"not started: {err or 'interrupted'}"}
        print(f"\nhard stop during {current}: writing what finished", flush=True)
    except Exception as err:   # the runner's own bug: what finished is still written and printed
        import traceback
        traceback.print_exc()
        run.status["runner"] = {"state": "failed", "why": f"during {current}: {type(err).__name__}: {err}"}
    finally:
        gpu_guard.quiet()
        run.write()
        report(run, meta, out)
    failed = failed_checks(run)
    return 1 if failed or run.status.get("check", {}).get("state") == "failed" else 0


def failed_checks(run: Run) -> list[str]:
    return [f"{r.get('shape')} {r.get('check')}" for r in run.results.get("check") or [] if not r.get("ok")]


def report(run: Run, meta: dict, out: Path) -> None:
    """The last lines of the output (the part a lent machine sends back): the table and a summary."""
    print()
    print(machine_line(meta))
    print(run.table())
    states = ", ".join(f"{p} {s.get('state')}" + (f" {s['seconds']:.0f}s" if "seconds" in s else "")
                       for p, s in run.status.items())
    print(f"parts: {states}")
    failed = failed_checks(run)
    if failed:
        print(f"FAILED checks: {', '.join(failed)}")
    print(f"wrote {out}/gpu_all.json, gpu_table.txt and gpu_<part>.json", flush=True)


def gate(part: Part, args, importable: bool, smoke: bool, left: float):
    """Why the part does not start now, or None."""
    if part.needs == "deepspeed":
        if not importable:
            return "DeepSpeed does not import here (or --no-deepspeed)"
        if smoke and not args.smoke_deepspeed:
            return "DeepSpeed left out of --cpu-smoke without --smoke-deepspeed"
    if not smoke and left < part.est_s / 2:
        return f"{left:.0f} s left of the run's budget; it needs about {part.est_s:.0f} s"
    return None


def reset_compiler() -> None:
    try:
        import torch._dynamo
        torch._dynamo.reset()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
