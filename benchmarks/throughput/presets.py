"""The benchmark's presets and implementations, as dotted overrides of a trainer config.

Every implementation runs the same preset, data and diffusion noise; only the FFN differs:

    ec           expert choice, static capacity schedule at k = moe.k (C = L k / E per sequence):
                 the same expected k as TC, so the FLOPs match exactly
    ec_dynamic   expert choice with the preset's timestep-aware schedule (E[k] = moe.k by FLOP
                 matching; per-sequence capacities, one host sync per layer)
    tc_cf1       token choice top-k, capacity factor 1.0 (padded slots computed)
    tc_dropless  token choice top-k, no capacity (grouped matmul / per-expert loop on ragged rows)
    dense        every MoE layer replaced by one SwiGLU of width (k + num_shared) * h_e: the same
                 active FFN parameters per token (only the router's E * D weights differ)
"""
from __future__ import annotations

import os

from benchmarks.throughput.code_state import ROOT

IMPLS = ("ec", "ec_dynamic", "tc_cf1", "tc_dropless", "dense")
DEFAULT_IMPLS = ("ec", "tc_cf1", "tc_dropless", "dense", "ec_dynamic")

# Overrides on top of configs/tiny.yaml. `tiny` is the preset itself. `ffn` widens the model so
# the FFN (the part EC, TC and dense differ in) is a real share of the step. `fine` has the
# reference setup's fine-grained experts (owt_ec.yaml: 512 experts of width 0.75 d, k=20, 2
# shared, routed width 15 d) scaled to a CPU: 64 experts of width 0.5 d, k=8, 2 shared, so the
# routed FFN (4 d wide) is most of the step; see benchmarks/RESULTS.md.
PRESETS = {
    "tiny": [],
    "ffn": ["model.d_model=256", "moe.expert_hidden=256",
            "train.global_batch_size=32", "train.micro_batch_size=16", "train.seq_len=128"],
    "fine": ["model.d_model=256", "moe.num_experts=64", "moe.expert_hidden=128", "moe.k=8",
             "moe.num_shared_experts=2", "moe.capacity.k_min=4", "moe.capacity.k_max=12",
             "train.global_batch_size=32", "train.micro_batch_size=16", "train.seq_len=128"],
}


def impl_overrides(impl: str, cfg) -> list:
    """The dotted overrides that turn the preset into implementation `impl`; `<impl>/compiled` is
    the same with train.compile on (and room for the first step's compile), plain names eager."""
    if impl.endswith("/compiled"):
        return impl_overrides(impl.removesuffix("/compiled"), cfg)[:-1] + ["train.compile=true",
                                                                            "train.setup_timeout_s=3600"]
    return _ffn_overrides(impl, cfg) + ["train.compile=false"]


def _ffn_overrides(impl: str, cfg) -> list:
    e = cfg.moe
    if impl == "ec":
        return ["moe.router=expert_choice", "moe.capacity.schedule=static"]
    if impl == "ec_dynamic":
        return ["moe.router=expert_choice"]
    if impl == "tc_cf1":
        return ["moe.router=token_choice", "moe.capacity_factor=1.0"]
    if impl == "tc_dropless":
        return ["moe.router=token_choice", "moe.capacity_factor=null"]
    if impl == "dense":   # shared experts are one SwiGLU too: fold them into the dense width
        shared = e.num_shared_experts * (e.shared_expert_hidden or e.expert_hidden)
        return ["moe.router=dense", f"moe.dense_hidden={e.k * e.expert_hidden + shared}"]
    raise ValueError(impl)


def common_overrides(args, run_dir: str) -> list:
    total = args.warmup + args.steps
    return [*PRESETS[args.preset], f"moe.ep_size={args.ep}", f"data.path={ROOT / args.data}",
            f"train.output_dir={run_dir}",
            f"train.max_steps={total}", f"train.log_every={args.window}", f"train.eval_every={total}",
            f"train.save_every={total}", "train.resume=never", "wandb.mode=disabled", "eval.batches=1",
            *args.override]


def in_code(args, path: str) -> str:
    """A repository-relative path as seen from the code the runs execute."""
    return path if os.path.isabs(path) else os.path.join(args.code_dir, path)


def load_run_config(args, impl: str, run_dir: str = "unused"):
    from rundir.config import load_config
    base = common_overrides(args, run_dir)
    path = in_code(args, args.config)
    cfg = load_config(path, tuple(base))
    return load_config(path, tuple(base + impl_overrides(impl, cfg)))


def describe(args, impls) -> list[dict]:
    """Per implementation: parameter counts from the config (active must match across impls)."""
    out = []
    for impl in impls:
        cfg = load_run_config(args, impl)
        c = cfg.model_config.param_counts()
        e = cfg.moe
        ffn = (e.dense_hidden if e.router == "dense" else
               f"{e.num_experts}x{e.expert_hidden} k={e.k} + {e.num_shared_experts} shared")
        out.append({"impl": impl, "total_M": c["total"] / 1e6, "active_M": c["active"] / 1e6,
                    "total": c["total"], "active": c["active"], "ffn": str(ffn)})
    return out
