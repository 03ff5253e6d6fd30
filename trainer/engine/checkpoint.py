"""Checkpoints that are complete before they are marked usable.

    <run_dir>/checkpoints/
        step_00000100/
            ...                    DeepSpeed's files: non-expert weights, ZeRO optimizer partitions
                                   (expert ones in their own groups), LR scheduler, client state
            experts/ep000.pt       our stacked experts of expert-parallel rank 0, ... : written by
                                   expert-data-parallel rank 0 only, so every expert exactly once
            moe_buffers.pt         TC aux-loss-free expert biases (identical on all ranks)
            rng/rank00000.pt       per-rank RNG states
            COMPLETE               written by rank 0 after a barrier: every rank has finished
        latest                     names the newest COMPLETE checkpoint (atomic replace)

DeepSpeed saves MoE expert weights only for its own MoE class (see trainer/engine/parallel.py) and drops
every state-dict key containing "expert" from its module file, so experts and expert biases are
saved here. Resuming needs the same world size and moe.ep_size (ZeRO partitions are per rank);
inference loading (`load_model_for_inference`) works from any checkpoint on one process.
"""
from __future__ import annotations

import logging
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from trainer.checkpoints import COMPLETE, prune, tag_for

log = logging.getLogger("ecdlm")


def expert_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if ".experts." in k}


def moe_buffer_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.endswith("expert_bias")}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_checkpoint(engine, model, run_dir: str, step: int, client_state: dict, *, rank: int,
                    ep_rank: int, ep_size: int, expert_dp_rank: int, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    root = os.path.join(run_dir, "checkpoints")
    tag = tag_for(step)
    path = os.path.join(root, tag)
    if rank == 0 and os.path.isdir(path):   # a stale, incomplete attempt at the same step
        shutil.rmtree(path)
    dist.barrier()
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    if expert_dp_rank == 0 and model.moe_layers():
        num_experts = model.cfg.moe.num_experts
        _atomic_save({"ep_rank": ep_rank, "ep_size": ep_size, "num_experts": num_experts,
                      "first_expert": ep_rank * num_experts // ep_size, "tensors": expert_state(model)},
                     os.path.join(path, "experts", f"ep{ep_rank:03d}.pt"))
    if rank == 0:
        _atomic_save(moe_buffer_state(model), os.path.join(path, "moe_buffers.pt"))
    _atomic_save(rng_state(), os.path.join(path, "rng", f"rank{rank:05d}.pt"))
    dist.barrier()   # every rank's files are on disk before the checkpoint is marked usable
    if rank == 0:
        with open(os.path.join(path, COMPLETE), "w") as f:
            f.write(f"{step}\n")
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(tag + "\n")
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        prune(root, keep_last)
    dist.barrier()
    return path





def load_checkpoint(engine, model, path: str, *, rank: int, ep_rank: int, ep_size: int) -> dict:
    """Collective. Restores engine (weights, optimizer, scheduler), experts, biases and RNG;
    returns the client state saved with it."""
    root, tag = os.path.split(path.rstrip("/"))
    # strict=False: DeepSpeed's module file lacks the expert keys, which are loaded just below
    _, client = engine.load_checkpoint(root, tag=tag, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    saved = client.get("layout", {})
    now = {"world_size": dist.get_world_size(), "ep_size": ep_size}
    if saved and saved != now:
        raise RuntimeError(f"checkpoint {path} was written with {saved}, but this run has {now}; "
                           f"resume with the same number of processes and moe.ep_size")
    state = {}
    if model.moe_layers():
        shard = torch.load(os.path.join(path, "experts", f"ep{ep_rank:03d}.pt"), map_location="cpu")
        state.update(shard["tensors"])
    state.update(torch.load(os.path.join(path, "moe_buffers.pt"), map_location="cpu"))
    missing = [k for k in state if k not in model.state_dict()]
    if missing:
        raise RuntimeError(f"checkpoint {path} has tensors this model lacks: {missing[:3]}")
    with torch.no_grad():
        current = model.state_dict()
        for k, v in state.items():
            current[k].copy_(v)
    rng_path = os.path.join(path, "rng", f"rank{rank:05d}.pt")
    if os.path.exists(rng_path):
        set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=False))
    return client



