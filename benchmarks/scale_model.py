"""Expert parallelism at sizes this machine cannot run, simulated from real router logits.

    python benchmarks/scale_model.py [--steps 300] [--json bench_out/scale_model.json]
                                     [--figure bench_out/scale_model.png]

1. Trains two tiny models in this process (no DeepSpeed) on data/default: the `fine` preset of
   benchmarks/train_throughput.py (d=256, 64 experts of width 128, k=8, 2 shared; EC with its
   linear_reverse 4..12 capacity, TC top-8 dropless with the owt_tc balancing: aux loss 1e-3 and
   the aux-loss-free bias at 1e-3).
2. Runs each on validation sequences, masked as in training, and keeps every MoE layer's input.
3. For expert-parallel sizes 2..64 (64/ep experts per rank, each rank holding B/ep of the
   sequences) it routes each rank's own tokens with the layer's router and counts, per layer:
     straggler   rows received per rank, max over mean: what a synchronous all-to-all (and the
                 expert matmuls behind it) waits for. EC: exactly 1.0, since every expert takes
                 the same number of rows from every source.
     bytes       rows sent to other ranks x d x 2 (bf16), per rank, max and mean; `dedup` is the
                 same when a token goes once per destination rank rather than once per expert slot
     drops       TC with capacity factor 1.0 on the same logits: the share of assignments dropped
                 (its buffers are fixed, so its straggler factor is 1.0 too, paid in drops)
   Host syncs per layer are measured, not simulated: one layer's forward+backward through the
   expert-parallel dispatcher (a one-rank gloo group, so the same code runs), counted by
   benchmarks/host_syncs.py; they do not depend on the number of ranks.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):   # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import format_table, machine_info, machine_line, write_json
from benchmarks.host_syncs import expert_parallel_layer_syncs

ROOT = Path(__file__).resolve().parents[1]
EP_SIZES = (2, 4, 8, 16, 32, 64)
BYTES_PER_VALUE = 2   # bf16 rows on the wire

FINE = {"model": {"vocab_size": 4096, "d_model": 256, "n_layers": 4, "n_heads": 4, "max_seq_len": 128},
        "moe": {"num_experts": 64, "expert_hidden": 128, "k": 8, "num_shared_experts": 2}}
ROUTERS = {
    "ec": {"router": "expert_choice", "capacity": {"schedule": "linear_reverse", "k_min": 4, "k_max": 12}},
    "tc": {"router": "token_choice", "capacity_factor": None, "aux_loss_coef": 1e-3, "bias_update_rate": 1e-3},
}


def config(router: str):
    from model import ModelConfig, from_dict
    return from_dict(ModelConfig, {"model": FINE["model"], "moe": {**FINE["moe"], **ROUTERS[router]}})


def token_stream(split: str) -> torch.Tensor:
    """The prepared split as one stream of token ids (shards are plain uint16 chunks)."""
    d = ROOT / "data" / "default" / split
    parts = [np.fromfile(p, dtype=np.uint16) for p in sorted(d.glob("shard_*.bin"))]
    if not parts:
        raise SystemExit(f"no shards under {d}: run `make setup` first")
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def noise(B: int, L: int, g: torch.Generator):
    from model.diffusion import stratified_u
    return stratified_u(B, g), torch.rand(B, L, generator=g)


def train(router: str, steps: int, batch: int, seed: int = 0):
    """A few hundred AdamW steps on random windows of the training stream."""
    from model import DiffusionTransformer, forward_loss
    cfg = config(router)
    torch.manual_seed(seed)
    model = DiffusionTransformer(cfg, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    stream, L = token_stream("train"), cfg.model.max_seq_len
    g = torch.Generator().manual_seed(seed)
    t0, first = time.perf_counter(), None
    for step in range(steps):
        start = torch.randint(0, len(stream) - L, (batch,), generator=g)
        tokens = torch.stack([stream[s:s + L] for s in start.tolist()])
        result = forward_loss(model, tokens, *noise(batch, L, g))
        loss, out = (result.loss, result.output) if hasattr(result, "loss") else (result[0], result[2])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        for layer, stats in zip(model.moe_layers(), out.moe):   # TC's bias, once per optimizer step
            layer.update_expert_bias(stats.tokens_per_expert)
        first = first if first is not None else float(loss.detach())
        if (step + 1) % 50 == 0:
            print(f"  {router} step {step + 1}: loss {float(loss.detach()):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return model, {"steps": steps, "batch": batch, "first_loss": first, "last_loss": float(loss.detach()),
                   "seconds": time.perf_counter() - t0}


@torch.no_grad()
def layer_inputs(model, sequences: int, seed: int = 1) -> tuple[list, torch.Tensor]:
    """Each MoE layer's input [B, L, D] on validation sequences, and the mask ratios r_B."""
    from model import forward_loss
    L = model.cfg.model.max_seq_len
    stream = token_stream("val")
    tokens = stream[: sequences * L].view(sequences, L)
    captured = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: captured.append((args[0], args[1])))
             for layer in model.moe_layers()]
    model.eval()
    forward_loss(model, tokens, *noise(sequences, L, torch.Generator().manual_seed(seed)))
    for h in hooks:
        h.remove()
    return [x for x, _ in captured], captured[0][1]


@torch.no_grad()
def rows_to_ranks(layer, x_BLD: torch.Tensor, r_B: torch.Tensor, ep: int, capacity_factor=None):
    """Per source rank p (its B/ep sequences): rows sent to each destination rank [ep, ep], the
    unique (token, destination) pairs [ep, ep], and (TC cf) assignments dropped / total."""
    from model.moe.routing import token_choice
    E = layer.cfg.num_experts
    El = E // ep
    B = x_BLD.shape[0]
    rows, unique, dropped, total = torch.zeros(ep, ep), torch.zeros(ep, ep), 0.0, 0.0
    for p, (x, r) in enumerate(zip(x_BLD.chunk(ep), r_B.chunk(ep))):
        logits = torch.nn.functional.linear(x.float(), layer.router.weight.float())
        if capacity_factor is None:
            routing, _ = layer.route(logits, r, None)
        else:
            bias = layer.expert_bias if layer.cfg.bias_update_rate > 0 else None
            routing = token_choice(logits.reshape(-1, E), layer.cfg.k, capacity_factor, expert_bias=bias)
            dropped += float(routing.drop_frac) * float(routing.tokens_per_expert.sum())
            total += float(routing.tokens_per_expert.sum())
        expert = routing.expert_of_slot().reshape(-1)
        token = routing.token_idx.reshape(-1)
        dest = expert // El
        rows[p] = torch.bincount(dest, minlength=ep).float()   # TC cf: its padding slots travel too
        if routing.slot_valid is not None:   # but only real assignments would in a deduplicated send
            keep = routing.slot_valid.reshape(-1)
            token, dest = token[keep], dest[keep]
        pairs = torch.unique(token * ep + dest)
        unique[p] = torch.bincount(pairs % ep, minlength=ep).float()
    assert B % ep == 0
    return rows, unique, (dropped / total if total else None)


def summarize(rows: torch.Tensor, unique: torch.Tensor, D: int) -> dict:
    ep = rows.shape[0]
    recv = rows.sum(0)                                   # rows each rank's experts compute
    off = ~torch.eye(ep, dtype=torch.bool)               # a rank's rows to itself never travel
    sent = (rows * off).sum(1) * D * BYTES_PER_VALUE
    sent_dedup = (unique * off).sum(1) * D * BYTES_PER_VALUE
    return {"straggler": float(recv.max() / recv.mean()), "rows_per_rank_max": float(recv.max()),
            "rows_per_rank_mean": float(recv.mean()), "bytes_sent_max": float(sent.max()),
            "bytes_sent_mean": float(sent.mean()), "bytes_sent_dedup_max": float(sent_dedup.max()),
            "bytes_sent_dedup_mean": float(sent_dedup.mean())}


def ep_path_syncs(layer, x_BLD: torch.Tensor, r_B: torch.Tensor, capacity_factor=None) -> int:
    """Host syncs of one forward+backward through the expert-parallel dispatcher, in model/moe/."""
    import copy
    import dataclasses
    if capacity_factor is not None:   # the TC layer, re-routed with a capacity
        layer = copy.deepcopy(layer)
        layer.cfg = dataclasses.replace(layer.cfg, capacity_factor=capacity_factor)
    return expert_parallel_layer_syncs(layer, x_BLD[:2], r_B[:2]).count("model/moe/")


def simulate(models: dict, sequences: int) -> list[dict]:
    out = []
    for router, model in models.items():
        xs, r_B = layer_inputs(model, sequences)
        variants = [(router, None)] + ([("tc_cf1", 1.0)] if router == "tc" else [])
        for name, cf in variants:
            for li, (layer, x) in enumerate(zip(model.moe_layers(), xs)):
                syncs = ep_path_syncs(layer, x, r_B, cf)
                for ep in EP_SIZES:
                    rows, unique, drop = rows_to_ranks(layer, x, r_B, ep, cf)
                    out.append({"router": name, "layer": li, "ep": ep, **summarize(rows, unique, x.shape[-1]),
                                "drop_frac": drop, "host_syncs_per_layer": syncs})
    return out


def table(rows: list[dict]) -> list[dict]:
    """Worst layer per (router, ep)."""
    best = {}
    for r in rows:
        key = (r["router"], r["ep"])
        if key not in best or r["straggler"] > best[key]["straggler"]:
            best[key] = r
    return [{**r, "MB_sent_max": r["bytes_sent_max"] / 1e6, "MB_sent_dedup_max": r["bytes_sent_dedup_max"] / 1e6}
            for r in best.values()]


def figure(rows: list[dict], path: Path, machine: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for router, style in (("ec", "o-"), ("tc", "s-"), ("tc_cf1", "^--")):
        rs = [r for r in rows if r["router"] == router]
        if not rs:
            continue
        eps = sorted({r["ep"] for r in rs})
        worst = [max(r["straggler"] for r in rs if r["ep"] == e) for e in eps]
        mean = [sum(r["straggler"] for r in rs if r["ep"] == e) / len([r for r in rs if r["ep"] == e]) for e in eps]
        label = {"ec": "EC (linear_reverse)", "tc": "TC dropless", "tc_cf1": "TC cf 1.0"}[router]
        a.plot(eps, worst, style, label=f"{label}, worst layer")
        a.plot(eps, mean, style, alpha=0.4, label=f"{label}, layer mean")
        b.plot(eps, [max(r["bytes_sent_max"] for r in rs if r["ep"] == e) / 1e6 for e in eps], style, label=label)
        if router == "ec":
            b.plot(eps, [max(r["bytes_sent_dedup_max"] for r in rs if r["ep"] == e) / 1e6 for e in eps], "o:",
                   label="EC, one row per destination rank")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("expert-parallel ranks")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    a.set_ylabel("rows per rank, max / mean (straggler factor)")
    b.set_ylabel("MB sent per rank per layer (max over ranks)")
    fig.suptitle(f"fine preset (64 experts, k=8), validation logits; {machine}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps per model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sequences", type=int, default=64, help="validation sequences (a multiple of 64)")
    p.add_argument("--json", default="bench_out/scale_model.json")
    p.add_argument("--figure", default="bench_out/scale_model.png")
    args = p.parse_args(argv)
    if args.sequences % max(EP_SIZES):
        p.error(f"--sequences must be a multiple of {max(EP_SIZES)}")
    meta = {**machine_info(torch.device("cpu"), torch.float32), "steps": args.steps, "batch": args.batch,
            "sequences": args.sequences, "preset": FINE, "routers": ROUTERS}
    print(machine_line(meta), flush=True)
    models, training = {}, {}
    for router in ROUTERS:
        models[router], training[router] = train(router, args.steps, args.batch)
    meta["training"] = training
    rows = simulate(models, args.sequences)
    summary = table(rows)
    print(format_table(summary, [("router", "router", "s"), ("ep", "ep", "d"), ("layer", "worst layer", "d"),
                                 ("straggler", "straggler", ".3f"), ("rows_per_rank_mean", "rows/rank", ".0f"),
                                 ("MB_sent_max", "MB sent max", ".2f"), ("MB_sent_dedup_max", "dedup MB", ".2f"),
                                 ("drop_frac", "dropped", ".3f"), ("host_syncs_per_layer", "syncs/layer", "d")]))
    write_json(args.json, meta, rows)
    figure(rows, Path(args.figure), machine_line(meta))
    print(f"wrote {args.json} and {args.figure}")


if __name__ == "__main__":
    main()
