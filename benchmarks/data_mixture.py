"""What a data mixture costs the loader: one source against a blend of two, side by side.

    python benchmarks/data_mixture.py [--sources DIR DIR] [--seq-len 512] [--json PATH]

Two measurements, each interleaved (single, mixture, single, ...) in one process:
  build   the time to build one micro-batch (what the prefetch thread does per micro-step),
          median over micro-batches; the ratio mixture / single is the mixture's overhead
  wait    perf/data_wait_frac as the trainer logs it: the share of a step spent blocked on the
          prefetch queue, with a fixed synthetic compute step (matmuls) per micro-batch
Both sources may be one directory (the default: data/default twice, under two names): the
mixture still keeps two token stores, two shuffles and the blending plan, which is its cost.
Nothing is asserted on time; the JSON records the machine and the load average.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import ForeignLoad, format_table, machine_info, machine_line, write_json  # noqa: E402
from rundir.config import MixtureEntry  # noqa: E402
from trainer.data import PackedLoader  # noqa: E402
from trainer.data.mixture import MixtureLoader, resolve_sources  # noqa: E402


def loaders(args, prefetch: int) -> dict:
    a, b = args.sources
    g, m = args.global_batch, args.micro_batch
    single = PackedLoader(Path(a) / "train", args.seq_len, g, m, 0, 1, args.seed, prefetch=prefetch)
    srcs = resolve_sources([MixtureEntry(a, 0.7, name="a"), MixtureEntry(b, 0.3, name="b")])
    mixed = MixtureLoader(srcs, "train", "pretrain", args.seq_len, g, m, 0, 1, args.seed, prefetch=prefetch)
    return {"single": single, "mixture": mixed}


def build_times(args) -> dict:
    """Seconds per micro-batch build, interleaved by step."""
    pair, times = loaders(args, 1), {"single": [], "mixture": []}
    for step in range(args.steps):
        for name, loader in pair.items():
            for micro in range(loader.grad_accum_steps):
                t0 = time.perf_counter()
                loader._layout.build(step, micro)
                times[name].append(time.perf_counter() - t0)
    return times


def wait_fracs(args) -> dict:
    """perf/data_wait_frac per repeat: blocked-on-queue time / step time, as trainer/loop.py computes it."""
    x = torch.randn(args.compute_dim, args.compute_dim)
    out = {"single": [], "mixture": []}
    for _ in range(args.repeat):
        for name, loader in loaders(args, 2).items():
            loader.next_micro_batch()   # start the thread; the first batch is not a steady state
            wait0, t0 = loader.wait_seconds, time.perf_counter()
            for _ in range(args.steps * loader.grad_accum_steps - 1):
                loader.next_micro_batch()
                for _ in range(args.compute_matmuls):
                    x = torch.tanh(x @ x)
            out[name].append((loader.wait_seconds - wait0) / (time.perf_counter() - t0))
            loader.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sources", nargs=2, default=["data/default", "data/default"], metavar="DIR")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="global batches per measurement")
    p.add_argument("--repeat", type=int, default=3, help="wait-fraction repeats per loader")
    p.add_argument("--compute-dim", type=int, default=256, help="synthetic compute: matmul size")
    p.add_argument("--compute-matmuls", type=int, default=4, help="synthetic compute: matmuls per micro-batch")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", default=f"benchmarks/results/data_mixture_{datetime.date.today()}.json")
    args = p.parse_args(argv)

    info = machine_info(torch.device("cpu"), torch.float32)
    load_before = os.getloadavg()
    with ForeignLoad() as foreign:
        builds = build_times(args)
        waits = wait_fracs(args)
    rows = []
    for name in ("single", "mixture"):
        rows.append({"loader": name, "build_ms": statistics.median(builds[name]) * 1e3,
                     "build_ratio": statistics.median(builds[name]) / statistics.median(builds["single"]),
                     "data_wait_frac": statistics.median(waits[name]), "wait_fracs": waits[name],
                     "micro_batches": len(builds[name])})
    meta = {**info, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "foreign_load_cores": foreign.cores, "args": vars(args)}
    print(machine_line(info))
    print(f"load average before {load_before}, after {meta['loadavg_after']}; other processes {foreign.cores:.2f} cores")
    print(format_table(rows, [("loader", "loader", "s"), ("build_ms", "build ms/micro-batch", ".3f"),
                              ("build_ratio", "build / single", ".3f"),
                              ("data_wait_frac", "perf/data_wait_frac", ".4f")]))
    write_json(args.json, meta, rows)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
