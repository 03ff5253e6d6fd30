"""What the GPU measurement (benchmarks/gpu.sh) shares: shapes, configs, device-side set-up.

Runs where only torch and the standard library exist (a lent GPU machine has no PyYAML for sure,
no DeepSpeed, no network): configs/*.yaml are read by a small parser for the subset they use.
`--cpu-smoke` swaps every shape for a toy one, so the same code runs on a CPU in seconds.
"""
from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]

# MoE layer shapes. owt: the reference paper's OWT model (owt_ec.yaml); 8b_a1b: ec_8b_a1b.yaml at
# its micro-batch. k_min..k_max is each config's linear_reverse range (E[k] = k).
LAYER_SHAPES = {
    "owt": dict(d=512, E=512, h=384, k=20, L=512, B=32, k_min=8, k_max=32),
    "8b_a1b": dict(d=2048, E=64, h=1280, k=8, L=2048, B=4, k_min=2, k_max=14),
}
SMOKE_LAYER_SHAPES = {
    "owt": dict(d=64, E=32, h=48, k=4, L=64, B=4, k_min=2, k_max=6),
    "8b_a1b": dict(d=96, E=8, h=64, k=2, L=128, B=1, k_min=1, k_max=3),
}
# the training-step presets and the toy overrides --cpu-smoke applies to them
STEP_CONFIGS = ("owt_ec", "owt_tc")
STEP_MICRO_BATCH = 32
SMOKE_STEP = {"model": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
              "moe": {"num_experts": 16, "expert_hidden": 32, "shared_expert_hidden": 32, "k": 4},
              "capacity": {"k_min": 2, "k_max": 6}, "micro_batch": 4}


def parse_scalar(text: str):
    text = text.strip()
    if text in ("null", "~", ""):
        return None
    if text in ("true", "false"):
        return text == "true"
    try:
        return ast.literal_eval(text)   # ints, floats (1.0e-3), quoted strings, [lists]
    except (ValueError, SyntaxError):
        return text


def load_yaml(path: Path) -> dict:
    """Nested mappings of scalars, indented by spaces, '#' comments: all configs/*.yaml use."""
    root: dict = {}
    stack = [(-1, root)]
    for raw in Path(path).read_text().splitlines():
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        key, _, value = line.strip().partition(":")
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        if value.strip():
            parent[key] = parse_scalar(value)
        else:
            parent[key] = {}
            stack.append((indent, parent[key]))
    return root


def step_config(name: str, smoke: bool, moe_overrides: Optional[dict] = None,
                diffusion_overrides: Optional[dict] = None):
    """(ModelConfig, micro-batch, sequence length) of configs/<name>.yaml on one device, with
    `moe_overrides` / `diffusion_overrides` laid over its sections (after the smoke shapes)."""
    from model import ModelConfig, from_dict
    raw = load_yaml(ROOT / "configs" / f"{name}.yaml")
    model, moe = dict(raw["model"]), dict(raw["moe"])
    moe["ep_size"] = 1   # one device: every expert here
    batch = STEP_MICRO_BATCH
    if smoke:
        model.update(SMOKE_STEP["model"])
        moe.update(SMOKE_STEP["moe"])
        if "capacity" in moe:
            moe["capacity"] = {**moe["capacity"], **SMOKE_STEP["capacity"]}
        batch = SMOKE_STEP["micro_batch"]
    moe.update(moe_overrides or {})
    diffusion = {**(raw.get("diffusion") or {}), **(diffusion_overrides or {})}
    cfg = from_dict(ModelConfig, {"model": model, "moe": moe, "diffusion": diffusion})
    return cfg, batch, model["max_seq_len"]


def has_option(section: str, name: str) -> bool:
    """Whether this checkout's config has `section.name` (options other work may add later)."""
    from model.config import DiffusionConfig, ModelArchConfig, MoEConfig
    cls = {"model": ModelArchConfig, "moe": MoEConfig, "diffusion": DiffusionConfig}[section]
    return name in {f.name for f in dataclasses.fields(cls)}


@dataclass
class Context:
    """What every part gets (benchmarks/gpu_main.py builds it; a part reads, never changes it)."""
    device: torch.device
    dtype: torch.dtype
    smoke: bool                 # toy shapes on the CPU
    shapes: dict                # the layer shapes (LAYER_SHAPES or SMOKE_LAYER_SHAPES)
    warmup: int                 # untimed layer calls before timing
    repeat: int                 # timed layer samples
    calls: int                  # back-to-back layer calls per timed sample
    step_warmup: int            # untimed training steps before timing
    step_repeat: int            # timed training steps
    peaks: dict = field(default_factory=dict)      # datasheet and measured matmul TFLOP/s
    results: dict = field(default_factory=dict)    # part -> its rows, for the parts before this one
    expert_loop: bool = False   # ragged experts forced onto the per-expert loop
    compile_backend: str = "inductor"
    with_deepspeed: bool = False
    limit: Optional[object] = None                 # this part's gpu_guard.Limit: limit.left() seconds

    def left(self) -> float:
        return self.limit.left() if self.limit is not None else float("inf")


def moe_config(shape: dict, impl: str):
    """MoEConfig of one layer-benchmark implementation at `shape`."""
    from model import ModelConfig, from_dict
    moe = {"num_experts": shape["E"], "expert_hidden": shape["h"], "k": shape["k"]}
    if impl == "ec_static":
        moe["router"] = "expert_choice"
    elif impl == "ec_linear_reverse":
        moe.update(router="expert_choice", capacity={"schedule": "linear_reverse", "k_min": shape["k_min"],
                                                       "k_max": shape["k_max"]})
    elif impl in ("tc_cf1", "tc_dropless"):
        moe.update(router="token_choice", capacity_factor=1.0 if impl == "tc_cf1" else None)
    else:
        raise ValueError(impl)
    return from_dict(ModelConfig, {"moe": moe}).moe


@torch.no_grad()
def device_layer(d_model: int, cfg, device, dtype, seed: int = 0):
    """MoELayer built on `device` with device-drawn N(0, 0.02) weights: drawing them from the
    CPU generator the layer uses by default costs seconds per layer (E=512: 300M numbers), and
    timings do not depend on the values."""
    from model.moe.layer import MoELayer
    with torch.device(device):
        layer = MoELayer(d_model, cfg, init_seed=None)
    torch.manual_seed(seed)
    for p in layer.parameters():
        p.normal_(0.0, 0.02)
    return layer.to(dtype)


def device_model(cfg, device, dtype):
    """DiffusionTransformer built on `device`, weights drawn there (the same N(0, std) recipe
    with 1/sqrt(2 n_layers) output projections, but the device's RNG): owt_ec has 4.8B
    parameters, whose CPU draws would cost a minute of the lease."""
    from model import DiffusionTransformer

    class DeviceInit(DiffusionTransformer):
        @torch.no_grad()
        def init_weights(self, seed: int) -> None:
            m = self.cfg.model
            std, std_out = m.init_std, m.init_std / math.sqrt(2 * m.n_layers)
            torch.manual_seed(seed)
            for name, p in self.named_parameters():
                if not name.endswith("norm.weight"):
                    p.normal_(0.0, std_out if name.endswith(("wo.weight", "w_out.weight", "w_out_EHD")) else std)

    with torch.device(device):
        model = DeviceInit(cfg)
    return model.to(dtype)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64; NaN anywhere gives NaN (which fails every bound)."""
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))
