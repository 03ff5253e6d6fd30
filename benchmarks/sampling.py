"""Fast sampling, measured: NFE, tokens/s and exact match of every decoding and cache setting, for
EC (static, linear_reverse), TC and dense models trained here, side by side in one run.

    python -m benchmarks.sampling [--quick] [--out benchmarks/results/sampling_DATE.json]
        [--figure benchmarks/figures/sampling.png] [--repeat 3] [--prompts 32]

Tasks (benchmarks/sampling_tasks.py): `copy` (the retrofit demonstration's copy task, answers of 6
tokens in a 128-token generation, so early stop matters) and `count` (answers of 64 tokens, 63
symbols and end-of-text, filling a 64-token generation; at generation 128, 127 symbols, it needs
about 6000 steps: docs/sampling.md). Every arch has the same active parameters (k=2 experts of width 32 per token;
dense: one SwiGLU of width 64) and the same training (steps, batch, learning rate, seed).

Settings, all with blocks of 32 (semi-autoregressive) and greedy proposals: `plain` is the sampler
before this work (fixed one token per step, no cache); then fixed with a prefix or dual cache;
threshold (tau 0.9) with no, prefix or dual cache; and threshold + dual + early stop.

Timing: the exact-match pass is the warm-up; then `repeat` rounds run every setting of a model
once, in an order rotated per round (benchmarks/common.time_interleaved), median per setting.
tokens/s = prompts x gen_length / seconds (the positions of the canvas decided, including those an
early stop fills), so ratios are ratios of wall time. Rounds are never discarded for foreign load
(this CPU is shared): the load of each is recorded, with os.getloadavg() before and after.
Never asserted on (tests/benchmarks/test_sampling_bench.py runs --quick for shape only).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import format_table, machine_info, machine_line, median_ms, time_interleaved, write_json  # noqa: E402
from benchmarks.sampling_tasks import ARCHS, EOD, exact_match, make_examples, train  # noqa: E402
from evaluation.sample import SampleConfig, generate  # noqa: E402

SETTINGS = {   # name -> SampleConfig fields (besides lengths)
    "plain": dict(decoding="fixed", cache="none"),
    "fixed+prefix": dict(decoding="fixed", cache="prefix"),
    "fixed+dual": dict(decoding="fixed", cache="dual"),
    "threshold": dict(decoding="threshold", cache="none"),
    "threshold+prefix": dict(decoding="threshold", cache="prefix"),
    "threshold+dual": dict(decoding="threshold", cache="dual"),
    "threshold+dual+stop": dict(decoding="threshold", cache="dual", early_stop=True),
}
TASKS = {   # name -> answer length (before EOD), gen_length, block, training steps
    "copy": dict(length=5, gen_length=128, block=32, steps=200),
    "count": dict(length=63, gen_length=64, block=16, steps=200),
}
QUICK = {"copy": dict(length=5, gen_length=16, block=8, steps=30), "count": dict(length=15, gen_length=16, block=8, steps=30)}


def sample_config(name: str, gen_length: int, block: int, threshold: float) -> SampleConfig:
    s = dict(SETTINGS[name])
    stop = s.pop("early_stop", False)
    return SampleConfig(gen_length=gen_length, steps=gen_length, block_length=block, threshold=threshold,
                        eod_id=EOD if stop else None, **s)


def measure_model(arch: str, model, held: list, spec: dict, args) -> list:
    """Rows of one trained model: every setting's exact match, NFE and median time."""
    prompts = [e.prompt for e in held]
    configs = {n: sample_config(n, spec["gen_length"], spec["block"], args.threshold) for n in SETTINGS}
    rows = {}
    for name, sc in configs.items():   # untimed: accuracy and forwards (and the warm-up)
        out = generate(model, prompts, sc)
        rows[name] = {"arch": arch, "setting": name, "exact_match": exact_match(out.generated_BG, held),
                      "nfe": out.forward_passes, "tokens_committed": out.tokens_committed}
    calls = {n: (lambda sc=sc: generate(model, prompts, sc)) for n, sc in configs.items()}
    times, loads, discarded = time_interleaved(calls, 0, args.repeat, torch.device("cpu"),
                                               max_foreign_cores=float("inf"))
    n_tokens = len(prompts) * spec["gen_length"]
    for name in SETTINGS:
        s = median_ms(times[name]) / 1e3
        rows[name].update(seconds=s, tokens_per_s=n_tokens / s, times_s=times[name],
                          foreign_cores_per_round=loads)
    base = rows["plain"]
    for r in rows.values():
        r["speedup_vs_plain"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["exact_match_minus_plain"] = r["exact_match"] - base["exact_match"]
    return list(rows.values())


def figure(rows: list, path: str, tasks: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.2), squeeze=False)
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    settings = list(SETTINGS)
    width = 0.8 / len(archs)
    for ax, task in zip(axes[0], tasks):
        for i, arch in enumerate(archs):
            sel = {r["setting"]: r for r in rows if r["task"] == task and r["arch"] == arch}
            xs = [j + i * width for j in range(len(settings))]
            ax.bar(xs, [sel[s]["tokens_per_s"] for s in settings], width, label=arch)
            for x, s in zip(xs, settings):
                ax.text(x, sel[s]["tokens_per_s"], f"{100 * sel[s]['exact_match']:.0f}", ha="center",
                        va="bottom", fontsize=6)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))])
        ax.set_xticklabels(settings, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("tokens/s (log); numbers: exact match %")
        ax.set_title(f"{task}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    day = datetime.date.today().isoformat()
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"sampling_{day}.json"))
    p.add_argument("--figure", default=str(ROOT / "benchmarks" / "figures" / "sampling.png"))
    p.add_argument("--quick", action="store_true", help="toy lengths and training: checks the script runs")
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated subset of {', '.join(ARCHS)}")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts, decoded as one batch")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds per model")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=16, help="training batch")
    p.add_argument("--gen-length", type=int, help="every task at this generation length (count: answers fill it)")
    p.add_argument("--block", type=int, help="every task with this block length")
    p.add_argument("--train-steps", type=int, help="every model trained this many steps")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    archs, tasks = args.archs.split(","), args.tasks.split(",")
    for a in archs:
        if a not in ARCHS:
            raise SystemExit(f"error: --archs: {a!r} is not one of {', '.join(ARCHS)}")
    for t in tasks:
        if t not in TASKS:
            raise SystemExit(f"error: --tasks: {t!r} is not one of {', '.join(TASKS)}")
    meta = {"machine": machine_info(torch.device("cpu"), torch.float32), "loadavg_start": os.getloadavg(),
            "args": vars(args), "settings": SETTINGS, "tasks": QUICK if args.quick else TASKS,
            "tokens_per_s": "prompts x gen_length / median wall seconds of one batched generate call"}
    print(machine_line(meta["machine"]), f"load average {meta['loadavg_start']}", flush=True)
    rows, train_s = [], {}
    for task in tasks:
        spec = dict((QUICK if args.quick else TASKS)[task])
        if args.gen_length:
            spec.update(gen_length=args.gen_length, length=args.gen_length - 1 if task == "count" else spec["length"])
        spec.update({k: v for k, v in (("block", args.block), ("steps", args.train_steps)) if v})
        meta.setdefault("task_specs", {})[task] = spec
        examples = make_examples(task, 2000, seed=0, length=spec["length"])
        held = make_examples(task, args.prompts, seed=1, length=spec["length"])
        for arch in archs:
            t0 = time.perf_counter()
            model = train(arch, examples, spec["gen_length"], spec["steps"], batch=args.batch, seed=0)
            train_s[f"{task}/{arch}"] = time.perf_counter() - t0
            got = measure_model(arch, model, held, spec, args)
            for r in got:
                r.update(task=task, gen_length=spec["gen_length"], block=spec["block"], prompts=len(held),
                         loadavg=os.getloadavg())
            rows += got
            write_json(args.out, {**meta, "partial": True}, rows)   # a run cut short keeps what it finished
            print(format_table(got, [("arch", "arch", "s"), ("setting", "setting", "s"), ("exact_match", "EM", ".3f"),
                                     ("nfe", "NFE", "d"), ("tokens_per_s", "tok/s", ".1f"),
                                     ("speedup_vs_plain", "x plain", ".2f")]), flush=True)
    for task in tasks:   # EC against TC at equal active parameters, per setting
        by = {(r["arch"], r["setting"]): r for r in rows if r["task"] == task}
        for r in rows:
            if r["task"] == task and ("tc", r["setting"]) in by:
                r["speed_vs_tc"] = r["tokens_per_s"] / by["tc", r["setting"]]["tokens_per_s"]
    meta.update(loadavg_end=os.getloadavg(), train_seconds=train_s)
    write_json(args.out, meta, rows)
    figure(rows, args.figure, tasks)
    print(f"wrote {args.out} and {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
