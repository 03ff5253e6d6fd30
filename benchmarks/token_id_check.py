"""Cost of the token-id check on every shard read (trainer/data/tokens.py): reads of one
sequence-sized range at random offsets, with the check against meta.json's vocab_size and
without it (vocab_size unset), interleaved, median of repeats. Numbers, not assertions.

    python -m benchmarks.token_id_check DATA_DIR [--tokens 2048] [--reads 2000] [--repeat 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from benchmarks.common import machine_info, machine_line, write_json
from trainer.data import TokenStore


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("data", help="a prepared data directory (its train split is read)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--reads", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/token_id_check.json")
    args = p.parse_args(argv)
    store = TokenStore(os.path.join(args.data, "train"))
    vocab = store.vocab_size
    starts = np.random.default_rng(0).integers(0, len(store) - args.tokens, args.reads)
    times = {"unchecked": [], "checked": []}
    for _ in range(args.repeat):
        for name in times:   # interleaved, so drifting load hits both alike
            store.vocab_size = vocab if name == "checked" else None
            t0 = time.perf_counter()
            for a in starts:
                store.read(int(a), int(a) + args.tokens)
            times[name].append((time.perf_counter() - t0) / args.reads)
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    load = os.getloadavg()
    info = {**machine_info(torch.device("cpu"), torch.float32), "loadavg": load}
    print(machine_line(info), f"load {load[0]:.1f}")
    print(f"read of {args.tokens} tokens: {med['unchecked']:.1f} us unchecked, {med['checked']:.1f} us checked "
          f"(ratio {med['checked'] / med['unchecked']:.2f})")
    write_json(args.out, info, [{"tokens": args.tokens, "reads": args.reads, "repeat": args.repeat,
                                 "unchecked_us": med["unchecked"], "checked_us": med["checked"],
                                 "ratio": med["checked"] / med["unchecked"]}])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
