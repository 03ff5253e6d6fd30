"""Forward+backward time of one MoE layer, against DeepSpeed's MoE and against the dense floor.

    python benchmarks/moe_layer.py [--batch 8 32] [--warmup 2] [--repeat 5] [--json out.json]

Implementations, all timed in one process, interleaved round by round (`--compile both` adds
each of ours and the dense floor through torch.compile, as `<impl>/compiled`, whose ratios are
to the compiled dense layer):
    ec           our MoELayer, expert choice, static k (capacity C = L k / E per sequence)
    tc_cf1       our MoELayer, token choice top-k, capacity factor 1.0 (padded slots computed)
    tc_dropless  our MoELayer, token choice top-k, no capacity (grouped matmul over ragged rows)
    deepspeed    deepspeed.moe.layer.MoE (TopKGate, same k, capacity factor 1.0, no RTS) with the
                 same SwiGLU experts
    dense        one SwiGLU of width k * h_e on the same tokens: the FLOP floor

FLOPs are counted from the capacity actually used: the slots each layer computes (EC: E*C;
TC with capacity: E*C padded slots; dropless: the T*k rows), 6*D*h_e per slot forward and
twice that backward, plus the router. DeepSpeed's one-hot dispatch/combine einsums are
reported separately (`overhead_gflop`): they are work, but not work an MoE layer needs.

The floor EC is held to (`ratio_to_floor`) is the dense SwiGLU's time plus the fewest bytes the EC
path must move: every assignment's row gathered once and scattered back once, in the forward and
again in the backward (dL/dy rows gathered, dL/dx rows scattered). That movement is timed in the
same rounds as the layers (`movement`: index_select of EC's own routing indices into a warm
buffer, then index_add_ back, twice), so floor = dense + movement, both measured here.
`--profile` adds the profiler's hottest operators of EC and dense, and their self time per step
by kind (matmul, gather/scatter, elementwise, memory, other): where the time over the floor goes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):   # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn as nn

from benchmarks.common import (available_memory, format_table, free_port, machine_info, machine_line, median_ms,
                               pick_device, profiled_steps, time_interleaved, wait_for_idle, write_json)
from model import ModelConfig, from_dict
from model.moe.experts import SwiGLU
from model.moe.layer import MoELayer
from model.moe.experts import swiglu

IMPLS = ("ec", "tc_cf1", "tc_dropless", "deepspeed", "dense")

# Operator kinds for the profile's per-step breakdown (matched against aten names, first wins).
OP_KINDS = (("matmul", ("mm", "bmm", "addmm", "matmul", "linear", "_grouped_mm", "einsum")),
            ("gather/scatter", ("index_select", "index_add", "index_copy", "gather", "scatter", "index",
                                "take_along_dim")),
            ("routing", ("topk", "sort", "argsort", "softmax", "_softmax", "logsumexp", "cumsum")),
            ("memory", ("empty", "zeros", "new_zeros", "zero_", "fill_", "copy_", "clone", "contiguous",
                        "to", "_to_copy", "empty_like", "new_empty", "resize_")),
            ("elementwise", ("mul", "mul_", "add", "add_", "silu", "silu_backward", "sigmoid", "div", "sum",
                             "neg", "exp", "sub", "where", "mean", "pow", "rsqrt", "sqrt", "clamp")))


class SwiGLUExpert(nn.Module):
    """One expert for DeepSpeed's MoE: the same SwiGLU as ours, w_in [D, 2H], w_out [H, D], no biases."""

    def __init__(self, d_model: int, hidden: int, std: float = 0.02):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(d_model, 2 * hidden) * std)
        self.w_out = nn.Parameter(torch.randn(hidden, d_model) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x @ self.w_in) @ self.w_out


def our_layer(args, router: str, capacity_factor=None) -> MoELayer:
    moe = {"router": router, "num_experts": args.experts, "expert_hidden": args.hidden, "k": args.k,
           "capacity_factor": capacity_factor}
    layer = MoELayer(args.d_model, from_dict(ModelConfig, {"moe": moe}).moe)
    layer.experts.init_weights(seed=0, layer=0, std_in=0.02, std_out=0.02)
    return layer


def deepspeed_layer(args):
    """DeepSpeed's MoE needs its expert-parallel groups even in one process: a 1-rank gloo world."""
    from deepspeed.moe.layer import MoE

    from trainer.engine.parallel import init_distributed
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    # TopKGate documents k in {1, 2}, but 0.19 sends any k > 2 to `topkgating`, which supports it
    moe = MoE(args.d_model, SwiGLUExpert(args.d_model, args.hidden), num_experts=args.experts, ep_size=1,
              k=args.k, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=True,
              use_rts=False)
    moe.set_deepspeed_parallelism()
    return moe


def deepspeed_chunks(args, batch: int, device) -> int:
    """Micro-batches DeepSpeed's layer must be split into to fit: its gate builds [S, E, C]
    one-hot tensors (int64 one_hot, float copies, combine weights and their gradient: about
    40 bytes per element), which for S = 16k tokens is ~90 GB."""
    chunks = 1
    while batch % (2 * chunks) == 0:
        S = batch // chunks * args.seq
        C = -(-S * args.k // args.experts)
        if 40 * S * args.experts * C < 0.5 * available_memory(device):
            break
        chunks *= 2
    return chunks


def make_step(model, kind: str, x, g, chunks: int = 1):
    """One forward+backward with a fixed upstream gradient; grads reset as zero_grad(set_to_none)."""
    params = list(model.parameters())

    def step():
        for p in params + [x]:
            p.grad = None
        for xc, gc in zip(x.detach().chunk(chunks), g.chunk(chunks)):
            xc = xc.requires_grad_() if chunks > 1 else x
            if kind == "ours":
                out = model(xc)
                torch.autograd.backward([out.hidden, out.loss], [gc, torch.ones_like(out.loss)])
            elif kind == "deepspeed":
                hidden, l_aux, _ = model(xc)
                torch.autograd.backward([hidden, l_aux], [gc, torch.ones_like(l_aux)])
            else:
                model(xc).backward(gc)
    return step


@torch.no_grad()
def slots_computed(model, kind: str, x) -> int:
    """(token, expert) rows the experts actually multiply, padding included."""
    if kind == "deepspeed":
        _, combine_SEC, _, _ = model.deepspeed_moe.gate(x.reshape(-1, x.shape[-1]).float())
        return combine_SEC.shape[1] * combine_SEC.shape[2]
    logits = torch.nn.functional.linear(x.float(), model.router.weight.float())
    routing, _ = model.route(logits, None, None)
    return routing.token_idx.numel()


def movement_step(model: MoELayer, x):
    """The EC floor's data movement, as one step: each assignment's row gathered (index_select
    into a warm buffer) and scattered back (index_add_ into a warm [T, D]), forward and backward
    alike, with the EC layer's own routing indices (its real access pattern)."""
    with torch.no_grad():
        x_TD = x.detach().reshape(-1, x.shape[-1])
        logits = torch.nn.functional.linear(x.detach().float(), model.router.weight.float())
        idx = model.route(logits, None, None)[0].token_idx.reshape(-1)
    rows = x_TD.new_empty(idx.numel(), x_TD.shape[-1])
    out = torch.empty_like(x_TD)

    def step():
        for _ in range(2):   # forward, then backward
            torch.index_select(x_TD, 0, idx, out=rows)
            out.zero_().index_add_(0, idx, rows)
    return step, 2 * 2 * 2 * rows.numel() * rows.element_size()   # 2 passes x (gather + scatter) x (read + write)


def op_kind(name: str) -> str:
    op = name.split("::")[-1]
    for kind, names in OP_KINDS:
        if op in names:
            return kind
    return "other"


def profile_impls(steps: dict, impls, max_foreign: float, row_limit: int) -> dict:
    """{impl: {"table": text, "by_kind_ms": {kind: self ms per step}}} from the profiler."""
    out = {}
    for name in impls:
        prof, calls, cores = profiled_steps(steps[name], max_foreign)
        kinds: dict = {}
        for ev in prof.key_averages():
            if ev.self_cpu_time_total > 0:
                k = op_kind(ev.key)
                kinds[k] = kinds.get(k, 0.0) + ev.self_cpu_time_total / 1e3 / calls
        out[name] = {"table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit,
                                                         max_name_column_width=40),
                     "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
                     "foreign_cores": cores}
    return out


def run_batch(args, batch: int, device, dtype) -> list[dict]:
    D, H, E, k = args.d_model, args.hidden, args.experts, args.k
    T = batch * args.seq
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, args.seq, D, generator=gen).to(device, dtype).requires_grad_()
    g = torch.randn(batch, args.seq, D, generator=gen).to(device, dtype)
    builders = {
        "ec": lambda: (our_layer(args, "expert_choice"), "ours"),
        "tc_cf1": lambda: (our_layer(args, "token_choice", 1.0), "ours"),
        "tc_dropless": lambda: (our_layer(args, "token_choice", None), "ours"),
        "deepspeed": lambda: (deepspeed_layer(args), "deepspeed"),
        "dense": lambda: (SwiGLU(D, k * H), "dense"),
    }
    steps, info, labels = {}, {}, []
    for impl in args.impls:
        for compiled in compile_modes(args.compile, impl):
            name = impl + ("/compiled" if compiled else "")
            labels.append(name)
            torch.manual_seed(0)
            model, kind = builders[impl]()
            model = model.to(device, dtype)
            if name == "ec":
                ec_model = model
            chunks = deepspeed_chunks(args, batch, device) if kind == "deepspeed" else 1
            slots = T * k if kind == "dense" else slots_computed(model, kind, x[: batch // chunks]) * chunks
            if compiled:
                model.compile(backend=args.compile_backend)   # in place; the warm-up rounds compile it
            steps[name] = make_step(model, kind, x, g, chunks)
            info[name] = layer_info(kind, slots, chunks, T, D, H, E)
    if "ec" in steps and "dense" in steps:
        steps["movement"], moved_bytes = movement_step(ec_model, x)
    times, loads, discarded = time_interleaved(steps, args.warmup, args.repeat, device)
    rows = []
    for name in labels:
        ms = median_ms(times[name])
        rows.append({"impl": name, "batch": batch, "ms": ms, "min_ms": min(times[name]) * 1e3,
                     "times_ms": [t * 1e3 for t in times[name]], **info[name],
                     "gflop_per_s": info[name]["gflop"] / ms * 1e3,
                     "foreign_cores_max": max(loads), "rounds_discarded": discarded})
    return finish_rows(args, rows, steps, times, moved_bytes if "movement" in steps else 0, batch)


def compile_modes(which: str, impl: str) -> list:
    """[False] eager, [True] compiled, or both; DeepSpeed's layer runs eager only."""
    if impl == "deepspeed":
        return [False]
    return {"eager": [False], "compiled": [True], "both": [False, True]}[which]


def layer_info(kind: str, slots: int, chunks: int, T: int, D: int, H: int, E: int) -> dict:
    router = 0 if kind == "dense" else 2 * T * D * E
    return {"slots": slots, "chunks": chunks,
                      "gflop": 3 * (6 * D * H * slots + router) / 1e9,   # backward = 2x forward
                      # DeepSpeed's one-hot einsums: dispatch and combine forward, dispatch's input
                      # grad and both combine grads backward, 2*S*E*C*D each per micro-batch
            "overhead_gflop": 5 * 2 * slots * T * D / chunks / 1e9 if kind == "deepspeed" else 0.0}


def finish_rows(args, rows: list, steps: dict, times: dict, moved_bytes: int, batch: int) -> list:
    """Ratios (compiled rows to the compiled dense layer, eager to eager), the floor, profiles."""
    ref = {r["impl"]: r["ms"] for r in rows}
    floor = None
    if "movement" in steps:
        move_ms = median_ms(times["movement"])
        floor = ref["dense"] + move_ms
        rows.append({"impl": "floor (dense + movement)", "batch": batch, "ms": floor, "movement_ms": move_ms,
                     "moved_bytes": moved_bytes, "movement_gb_per_s": moved_bytes / move_ms / 1e6,
                     "times_ms": [t * 1e3 for t in times["movement"]]})
    for r in rows:
        dense = "dense/compiled" if r["impl"].endswith("/compiled") else "dense"
        r["ratio_to_dense"] = r["ms"] / ref[dense] if dense in ref else None
        r["ratio_to_floor"] = r["ms"] / floor if floor else None
        r["ratio_to_deepspeed"] = r["ms"] / ref["deepspeed"] if "deepspeed" in ref else None
    if args.profile:
        prof = profile_impls(steps, [n for n in ("ec", "dense", "ec/compiled", "dense/compiled") if n in steps],
                             0.25, args.profile_ops)
        for r in rows:
            if r["impl"] in prof:
                r["profile"] = prof[r["impl"]]
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256, help="expert hidden width h_e")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--compile", choices=("eager", "compiled", "both"), default="eager",
                   help="our layers and the dense floor eager, through torch.compile, or both side by side")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="first wait up to S seconds for other processes to leave the CPU")
    p.add_argument("--json", help="write rows {impl, batch, ms, ratio_to_dense, ...} here")
    p.add_argument("--profile", action="store_true",
                   help="also profile EC and dense: hottest operators and self time per step by kind")
    p.add_argument("--profile-ops", type=int, default=20, help="rows of the profile tables")
    args = p.parse_args(argv)

    device, dtype = pick_device()
    waited = wait_for_idle(args.wait_idle) if args.wait_idle > 0 and device.type == "cpu" else 0.0
    meta = {**machine_info(device, dtype), "waited_for_idle_s": round(waited, 1),
            **{k: getattr(args, k) for k in ("seq", "d_model", "experts", "k", "hidden", "warmup", "repeat",
                                             "compile", "compile_backend")}}
    meta["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    print(machine_line(meta), f"| load average {meta['loadavg_start'][0]:.1f}")
    print(f"MoE layer fwd+bwd: L={args.seq} D={args.d_model} E={args.experts} k={args.k} h_e={args.hidden} "
          f"on {device.type} {meta['dtype']}, {meta['threads']} threads; median of {args.repeat} after "
          f"{args.warmup} warm-up rounds")
    rows = []
    for batch in args.batch:
        rows += run_batch(args, batch, device, dtype)
    columns = [("impl", "impl", "s"), ("batch", "B", "d"), ("ms", "ms", ".1f"), ("min_ms", "min", ".1f"),
               ("ratio_to_dense", "/dense", ".2f"), ("ratio_to_floor", "/floor", ".2f"),
               ("ratio_to_deepspeed", "/deepspeed", ".3f"),
               ("slots", "slots", "d"), ("gflop", "GFLOP", ".1f"), ("gflop_per_s", "GFLOP/s", ".1f"),
               ("chunks", "chunks", "d")]
    print(format_table(rows, columns))
    for r in rows:
        if "movement_ms" in r:
            print(f"B={r['batch']}: floor = dense + movement {r['movement_ms']:.1f} ms "
                  f"({r['moved_bytes'] / 1e6:.0f} MB of rows gathered and scattered, {r['movement_gb_per_s']:.1f} GB/s)")
        if "profile" in r:
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in r["profile"]["by_kind_ms"].items())
            print(f"\nprofile {r['impl']} B={r['batch']}, self ms per step by kind: {kinds}\n{r['profile']['table']}")
    noisy = [r for r in rows if r.get("rounds_discarded") or r.get("foreign_cores_max", 0) > 0.25]
    if noisy:
        print(f"note: other processes used the CPU during this run (max {max(r.get('foreign_cores_max', 0) for r in rows):.2f} "
              f"cores in a kept round; {max(r.get('rounds_discarded', 0) for r in rows)} rounds discarded)")
    if any(r.get("chunks", 1) > 1 for r in rows):
        print("chunks > 1: DeepSpeed ran as that many micro-batches (its [S, E, C] one-hot tensors do not fit)")
    meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    if args.json:
        write_json(args.json, meta, rows)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
