"""A finished run's model state, read without building a model: which checkpoint, its config, and
its tensors with every expert re-assembled, from a checkpoint of any parallel layout (ecdlm's
layout-free store) or a safetensors directory (`python -m evaluation.hf import`).
Training (`init.from`) and every evaluation tool read runs through here.
"""
from __future__ import annotations

import os

from .checkpoint_store import WEIGHTS, FragmentReader
from .checkpoints import resolve_checkpoint
from .config import load_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_path(path: str) -> str:
    """A path from a saved config: relative ones were relative to the training job's working
    directory, which is normally the repository root."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(REPO_ROOT, path)


def is_safetensors_checkpoint(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json"))


def iter_model_state(path: str):
    """(name, tensor) pairs of the whole model's state, experts re-assembled, one at a time, for
    exporters that write as they read: peak memory is one tensor (read from memory-mapped
    safetensors), whatever layout wrote the checkpoint."""
    if is_safetensors_checkpoint(path):
        from .safetensors_io import iter_safetensors_dir
        yield from iter_safetensors_dir(path)
        return
    yield from FragmentReader(path).iter_full(WEIGHTS)   # any layout; safetensors and JSON only


def full_model_state(path: str) -> dict:
    """The whole model's state dict from a checkpoint directory, experts re-assembled."""
    return dict(iter_model_state(path))


def checkpoint_and_config(run_or_ckpt: str):
    """(checkpoint directory, RunConfig with moe.ep_size=1) of a run directory (its newest usable
    checkpoint), its checkpoints/ folder or one checkpoint directory, without loading any weights.
    Whatever the path, the checkpoint is verified (manifest, checksums, structure) first:
    CheckpointError (a FileNotFoundError) names what is wrong."""
    ckpt = resolve_checkpoint(run_or_ckpt)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    return ckpt, load_config(os.path.join(run_dir, "config.yaml"), ("moe.ep_size=1",))
