"""What the benchmark prints and writes: the set-up it measured (preset, code, machine), the
parameter counts, the runs' table with the two targets, and the JSON (meta + rows)."""
from __future__ import annotations

import time

from benchmarks.common import format_table, machine_line, write_json
from benchmarks.throughput.code_state import model_sha
from benchmarks.throughput.presets import PRESETS, describe, load_run_config

RUN_COLUMNS = [("impl", "impl", "s"), ("tokens_per_s", "tokens/s", ",.0f"), ("step_s", "step s", ".4f"),
               ("rank_spread", "rank spread s", ".4f"), ("step_vs_dense", "/dense", ".2f"),
               ("speedup_vs_tc_dropless", "x tc_dropless", ".2f"), ("mean_k", "mean k", ".2f"),
               ("drop_frac", "drop", ".3f"), ("tflops_per_device", "TFLOP/s/dev", ".4f"),
               ("windows", "windows", "d"), ("foreign_cores", "other cores", ".2f")]


def print_setup(args, impls, code: dict, machine: dict) -> None:
    """The preset, the code, the machine, the schedules and the parameter counts, before any timing."""
    cfg = load_run_config(args, impls[0])
    m, e, t = cfg.model, cfg.moe, cfg.train
    print(f"preset {args.preset} ({args.config} + {' '.join(PRESETS[args.preset]) or 'no overrides'}): "
          f"d_model {m.d_model}, {m.n_layers} layers, E {e.num_experts} x h_e {e.expert_hidden}, k {e.k}, "
          f"{e.num_shared_experts} shared; {t.global_batch_size} x {t.seq_len} tokens per step, "
          f"micro-batch {t.micro_batch_size}; fp32")
    print(machine_line(machine))
    print(f"code: commit {code['commit']}, model/ sha {code['model_sha']}"
          + (f", uncommitted changes in {' '.join(code['dirty'])}" if code["dirty"] else ""))
    env = machine["env"]
    print("environment: " + (" ".join(f"{k}={v}" for k, v in env.items()) or "default allocator, no thread settings"))
    sched = load_run_config(args, "ec_dynamic").moe.capacity
    print(f"ec uses the static capacity schedule at k = moe.k = {e.k} (the same k and FLOPs as TC); ec_dynamic "
          f"the preset's {sched.schedule} schedule (k {sched.k_min:g}..{sched.k_max:g}, E[k] = {sched.k_target:g}); "
          "dense = one SwiGLU of the same active width")
    params = describe(args, impls)
    print(format_table(params, [("impl", "impl", "s"), ("total_M", "total params M", ".3f"),
                                ("active_M", "active params M", ".3f"), ("ffn", "FFN", "s")]))
    act = {d["impl"]: d["active"] for d in params}
    if "dense" in act:
        diffs = {i: a - act["dense"] for i, a in act.items() if i != "dense"}
        print(f"active params minus dense: {diffs} (the routers' E x D weights: "
              f"{cfg.model.n_layers * e.num_experts * m.d_model})")


def print_runs(args, rows: list[dict], code: dict) -> dict:
    """The runs' table and the two targets; returns the targets' ratios."""
    print(format_table(rows, RUN_COLUMNS))
    ref = {r["impl"]: r for r in rows}
    if model_sha() != code["model_sha"]:
        print(f"note: model/ in the working tree changed during the benchmark; every run executed the snapshot "
              f"taken at the start (model/ sha {code['model_sha']})")

    def verdict(ok: bool, *impls) -> str:
        if any(ref[i]["noisy"] for i in impls):
            return f"INCONCLUSIVE ({' and '.join(i for i in impls if ref[i]['noisy'])} measured on a busy machine)"
        return "met" if ok else "MISSED"
    targets = {}
    for mode in ("", "/compiled"):   # compiled compared with compiled
        ec, tc, dense = "ec" + mode, "tc_dropless" + mode, "dense" + mode
        key = mode.replace("/", "_")
        if {ec, tc} <= ref.keys():
            x = ref[ec]["speedup_vs_tc_dropless"]
            targets["ec_vs_tc_dropless_tokens_per_s" + key] = x
            print(f"target {ec} >= 1.2x {tc} tokens/s: {x:.2f}x -> {verdict(x >= 1.2, ec, tc)}")
        if {ec, dense} <= ref.keys():
            x = ref[ec]["step_vs_dense"]
            targets["ec_vs_dense_step_s" + key] = x
            print(f"target {ec} step time <= 1.2x {dense}: {x:.2f}x -> {verdict(x <= 1.2, ec, dense)}")
        if mode and {ec, "ec"} <= ref.keys():
            x = ref["ec"]["step_s"] / ref[ec]["step_s"]
            targets["ec_compiled_speedup"] = x
            print(f"ec compiled against eager: {x:.2f}x faster -> {'met' if x >= 1.0 else 'SLOWER'}")
    print(f"medians over windows of {args.window} steps during which other processes used <= {args.max_foreign} "
          f"cores ('*' above marks the others); 'other cores' is the most they used in a counted window")
    noisy = [r["impl"] for r in rows if r["noisy"]]
    if noisy:
        print(f"NOISY: {', '.join(noisy)} had fewer than {args.min_clean} clean windows, so all their windows "
              "count; rerun with --wait-idle / --max-rounds for cleaner numbers")
    return targets


def write_profile_json(args, code: dict, machine: dict, rows: list[dict]) -> None:
    write_json(args.json, {"mode": "profile", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": code,
                           "machine": machine, "preset": args.preset,
                           "overrides": PRESETS[args.preset] + args.override, "threads": args.threads}, rows)


def write_runs_json(args, impls, code: dict, machine: dict, rows: list[dict], targets: dict) -> None:
    cfg = load_run_config(args, impls[0])
    t, e = cfg.train, cfg.moe
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": code, "machine": machine, "dtype": "float32",
            "backend": "gloo", "nproc": args.nproc, "ep_size": args.ep, "threads": args.threads,
            "preset": args.preset, "overrides": PRESETS[args.preset] + args.override,
            "steps": args.steps, "warmup": args.warmup, "window": args.window, "rounds": args.rounds,
            "tokens_per_step": t.global_batch_size * t.seq_len,
            "ec_schedule": f"static (k = moe.k = {e.k})",
            "ec_dynamic_schedule": load_run_config(args, "ec_dynamic").moe.capacity.schedule,
            "per_run_idle_wait_max_s": args.wait_idle, "max_foreign_cores": args.max_foreign, "targets": targets}
    write_json(args.json, meta, rows)
    print(f"wrote {args.json}")
