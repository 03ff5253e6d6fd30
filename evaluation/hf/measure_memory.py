"""Peak memory of an export: `python -m evaluation.hf.measure_memory WORK_DIR [--shard-size 1GB]`.

Writes a synthetic checkpoint of a ~0.9B-parameter MoE (3.6 GB fp32; experts split over two
ranks' fragment files, as an ep=2 run leaves them) in the trainer's checkpoint format, then runs
`python -m evaluation.hf export` on it in a child process and reports that process's peak
resident memory (ru_maxrss) against the model's size. Numbers, not assertions: see benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import subprocess
import sys
import time

import yaml

from model import DiffusionTransformer, ModelConfig, from_dict
from rundir.checkpoint_store import WEIGHTS, FragmentWriter
from rundir.checkpoints import write_manifest

ARCH = {"model": {"vocab_size": 32000, "d_model": 1024, "n_layers": 8, "n_heads": 8, "max_seq_len": 512},
        "moe": {"router": "expert_choice", "num_experts": 64, "expert_hidden": 512, "k": 8}}


def write_checkpoint(work: str) -> tuple:
    cfg = from_dict(ModelConfig, ARCH)
    # this process holds the model once (its init is seeded, not meta-device safe); only the
    # export child is measured
    state = DiffusionTransformer(cfg).state_dict()
    ckpt = os.path.join(work, "run", "checkpoints", "step_00000001")
    ranks = [FragmentWriter(ckpt, r) for r in (0, 1)]
    total, largest = 0, 0
    for name in list(state):
        t = state.pop(name)
        shape = t.shape
        total += t.numel()
        largest = max(largest, t.numel())
        if ".experts." in name:   # rows [0, E/2) on rank 0, [E/2, E) on rank 1
            half = shape[0] // 2
            for r, rows in enumerate((t[:half], t[half:])):
                ranks[r].add(name, WEIGHTS, shape, r * rows.numel(), rows)
        else:
            ranks[0].add(name, WEIGHTS, shape, 0, t)
        del t
    files = {}
    for w in ranks:   # one rank at a time, as ranks would
        files.update(w.write())
        w.tensors.clear()
    write_manifest(ckpt, 1, {os.path.relpath(f, ckpt): d for f, d in files.items()}, healthy=True)
    with open(os.path.join(work, "run", "config.yaml"), "w") as f:
        yaml.safe_dump({**{k: dataclasses.asdict(getattr(cfg, k)) for k in ("model", "moe", "diffusion")},
                        "data": {"path": os.path.join(work, "no-tokenizer")}}, f)
    return ckpt, total, largest


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:   # the child has just exited
        pass
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("work")
    p.add_argument("--shard-size", default="1GB")
    args = p.parse_args(argv)
    ckpt, n, largest = write_checkpoint(args.work)
    out = os.path.join(args.work, "hf")
    child = subprocess.Popen([sys.executable, "-m", "evaluation.hf", "export", ckpt, out, "--max-shard-size",
                              args.shard_size])
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    while child.poll() is None:   # sample: anonymous memory (what the export allocates) apart from
        peak = {k: max(v, _status_kib(child.pid, k)) for k, v in peak.items()}   # mapped file pages
        time.sleep(0.02)
    if child.returncode:
        return child.returncode
    hwm = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024   # Linux: KiB
    gib = 2 ** 30
    print(f"model {n / 1e6:,.0f}M parameters = {n * 4 / gib:.2f} GiB fp32, largest tensor {largest * 4 / gib:.2f} GiB; "
          f"shards {args.shard_size}; export peak RSS {hwm / gib:.2f} GiB (sampled: anonymous "
          f"{peak['RssAnon'] * 1024 / gib:.2f} GiB, file-backed mapped {peak['RssFile'] * 1024 / gib:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
