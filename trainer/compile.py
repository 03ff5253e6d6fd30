"""train.compile: every transformer block through torch.compile (inductor: CPU and CUDA).

    auto  - on where the run has a GPU, off on CPU (the default)
    true  - on
    false - off

Why those defaults: on a GPU a compiled block fuses its elementwise work (norms, RoPE, SwiGLU,
the routing softmax) into a few kernels and launches far fewer of them, and expert choice's
static shapes let it compile whole. On CPU the gain is small next to the matmuls and the
first steps pay the compile (tens of seconds per block variant on a loaded 2-core machine):
docs/speed.md has the measurement.

Blocks are compiled in place (nn.Module.compile), so parameter names, checkpoints and the
DeepSpeed engine see the same module tree. Every block shares one code object and so one cache
of compiled graphs; a dynamic capacity schedule adds its two size variants (largest and total
capacity, which become symbolic after they first change), training and evaluation one each.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

# the graphs one block's code may hold: train and eval, static and the dynamic-size variants,
# activation checkpointing's recompute; past the limit dynamo falls back to eager silently
_RECOMPILE_LIMIT = 32


def use_compile(setting, device_type: str) -> bool:
    """train.compile resolved for a device type ('cuda' or 'cpu')."""
    if setting == "auto":
        return device_type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"train.compile={setting!r} must be auto, true or false")


def compile_backend() -> str:
    """inductor, unless ECDLM_COMPILE_BACKEND names another torch.compile backend: aot_eager runs
    dynamo and AOTAutograd (graph capture, the backward graph) without generating code, which the
    multi-process tests use on a shared CPU where inductor's code generation takes minutes."""
    return os.environ.get("ECDLM_COMPILE_BACKEND", "inductor")


def compile_blocks(model: nn.Module) -> int:
    """Compiles each of model.blocks in place; returns how many."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    for block in model.blocks:
        block.compile(backend=compile_backend())
    return len(model.blocks)
