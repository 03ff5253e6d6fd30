"""The DeepSpeed JSON: engine knobs (ZeRO stage, offload, buckets) only. Quantities the run config
owns (batch sizes, accumulation, precision, clipping) are "auto" there and filled in here; a
concrete JSON value that contradicts the run config is an error naming both.
"""
from __future__ import annotations

import copy
import json
import os

from model.config import ConfigError


def load_ds_config(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"DeepSpeed config {path} does not exist (see ds_configs/: zero1.json, "
                          f"zero2.json, zero2_offload.json)")
    with open(path) as f:
        try:
            ds = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {path} holds a JSON {type(ds).__name__}; it must be an object of "
                          f"DeepSpeed settings, as in ds_configs/zero2.json")
    return ds


def _fill(ds: dict, key_path: tuple, value, yaml_key: str, src: str) -> None:
    node = ds
    for k in key_path[:-1]:
        node = node.setdefault(k, {})
    current = node.get(key_path[-1], "auto")
    if current == "auto":
        node[key_path[-1]] = value
    elif current != value:
        raise ConfigError(f"{src}: {'.'.join(key_path)}={current!r} contradicts {yaml_key}={value!r}; "
                          f"set it to \"auto\" in the JSON and keep the value in the YAML")


def resolve_ds_config(ds_in: dict, cfg, dp_size: int, bf16: bool, has_moe: bool, src: str = "ds_config") -> dict:
    """Fill every "auto" from the run config; check the rest agrees. Returns a new dict."""
    ds = copy.deepcopy(ds_in)
    t = cfg.train
    denom = t.micro_batch_size * dp_size
    if t.global_batch_size % denom:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                          f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp_size}")
    _fill(ds, ("train_batch_size",), t.global_batch_size, "train.global_batch_size", src)
    _fill(ds, ("train_micro_batch_size_per_gpu",), t.micro_batch_size, "train.micro_batch_size", src)
    _fill(ds, ("gradient_accumulation_steps",), t.global_batch_size // denom,
          "train.global_batch_size / (train.micro_batch_size x dp)", src)
    _fill(ds, ("gradient_clipping",), float(t.grad_clip), "train.grad_clip", src)
    _fill(ds, ("bf16", "enabled"), bool(bf16), "train.precision", src)
    _fill(ds, ("fp16", "enabled"), False, "train.precision (fp16 is not supported; use bf16)", src)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if has_moe and stage == 3:
        raise ConfigError(f"{src}: ZeRO stage 3 cannot hold MoE layers (DeepSpeed refuses MoE under "
                          f"stage 3); use ds_configs/zero2.json (or zero1.json, or zero2_offload.json "
                          f"to move optimizer state to CPU)")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{src}: remove the \"{key}\" section; the optimizer and LR schedule come "
                              f"from the run config (optim.*), so they are stated once")
    # the trainer passes torch's AdamW (fused on GPU) as a client optimizer
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10 ** 9)   # our own metrics sinks do the logging
    ds.setdefault("wall_clock_breakdown", False)
    return ds
