"""The one place where ecdlm's MoE layers meet DeepSpeed's expert-parallel conventions.

DeepSpeed decides how ZeRO treats a parameter from three things, all set here:
  1. expert-parallel and expert-data-parallel process groups, created by deepspeed.utils.groups
     under the name "ep_size_<n>";
  2. parameter tags: `param.allreduce = False` and `param.group_name = "ep_size_<n>"` mark expert
     weights, whose gradients are reduced only across ranks holding the same experts;
  3. optimizer param groups with `moe: True`, so ZeRO partitions expert state in the
     expert-data-parallel group.
The engine only turns that machinery on (`has_moe_layers`) when it finds an instance of its own
`deepspeed.moe.layer.MoE` class among the modules. Our layers are plain PyTorch (model/ never
imports DeepSpeed), so `MoEMarker` is a stateless instance of that class attached beside the
model. It has no parameters, so DeepSpeed's per-expert checkpoint files (keyed by its own expert
module names) are empty; trainer/engine/checkpoint.py saves our stacked experts itself, once each.

Process groups themselves start in `init_distributed` below.
"""
from __future__ import annotations

import datetime

import deepspeed
import torch.distributed as dist
from torch.distributed import distributed_c10d
import torch.nn as nn
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups

from model.config import ConfigError


# DeepSpeed's op-builder name for its CPU shared-memory all-reduce (ops/op_builder/cpu/comm.py).
_SHM_ALLREDUCE_OP = "deepspeed_shm_comm"


def set_comm_timeout(seconds: float) -> None:
    """Bound every collective of every process group the run creates, before any exists.

    DeepSpeed creates its groups (expert-parallel and expert-data-parallel in
    utils/groups.py, the engine's data-parallel clone of the world) with `dist.new_group(ranks)`
    and no timeout, so they get torch's default (30 minutes for gloo, 10 for NCCL), whatever
    DEEPSPEED_TIMEOUT or init_process_group was given. new_group reads that default from
    distributed_c10d's module globals when it is called (`_get_default_timeout`), so setting them
    here reaches every group created later; the world group gets it through init_distributed."""
    timeout = datetime.timedelta(seconds=seconds)
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def group_timeouts() -> dict:
    """{name: timeout} of the world group and our expert groups (for tests and the log)."""
    def timeout(group):
        backend = group._get_backend(group._device_types[0])
        return backend.options._timeout
    out = {"world": timeout(distributed_c10d._get_default_group())}
    for name, group in groups._get_expert_parallel_group_dict().items():
        out[f"expert_parallel/{name}"] = timeout(group)
    for name, group in groups._get_expert_data_parallel_group_dict().items():
        out[f"expert_data_parallel/{name}"] = timeout(group)
    return out


def init_distributed(**kwargs) -> None:
    """deepspeed.init_distributed (NCCL on GPUs, gloo on CPU; env:// or MPI discovery), without
    DeepSpeed's CPU shared-memory all-reduce.

    On the CPU accelerator DeepSpeed JIT-compiles that extension in every new environment (minutes
    on a small machine; a build killed half-way leaves torch's lock file behind and every later
    run waits on it forever), and when all ranks share a host each rank creates a 64 MiB
    /dev/shm segment that nothing ever unlinks (shm.cpp's shared_close is never called), so every
    run leaks 64 MiB of RAM per rank until reboot. Only DeepSpeed's inference tensor parallelism
    calls that all-reduce; training never does. Marking the op incompatible makes DeepSpeed skip
    it (comm/torch.py: build_shm_op returns None) and use torch.distributed's all-reduce.
    """
    deepspeed.ops.__compatible_ops__[_SHM_ALLREDUCE_OP] = False
    # DeepSpeed's own default was bound when it was imported; pass the one set_comm_timeout chose
    kwargs.setdefault("timeout", distributed_c10d.default_pg_timeout)
    deepspeed.init_distributed(**kwargs)


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def create_expert_groups(ep_size: int):
    """DeepSpeed's expert-parallel groups for `ep_size`; returns our rank's expert-parallel group."""
    world = dist.get_world_size()
    if world % ep_size:
        raise ConfigError(f"moe.ep_size={ep_size} must divide the world size {world} "
                          f"(choose one of {[d for d in range(1, world + 1) if world % d == 0]})")
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


def expert_data_parallel_group(ep_size: int):
    return groups._get_expert_data_parallel_group(expert_group_name(ep_size))


class MoEMarker(MoE):
    """Makes the DeepSpeed engine enable its MoE handling (see the module docstring).

    MoE.__init__ is skipped on purpose: it would build DeepSpeed's own gate and experts. Only the
    attributes the engine reads are set.
    """

    def __init__(self, num_experts: int, ep_size: int):
        nn.Module.__init__(self)
        self.num_experts, self.ep_size = num_experts, ep_size
        self.expert_group_name = expert_group_name(ep_size)
        # 0, so the engine's checkpoint loader looks for none of its own per-expert files
        # (it saved none: this module has no state); ZeRO reads groups and tags, not this
        self.num_local_experts = 0

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """The engine calls this on MoE modules to create groups; create_expert_groups already did."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("MoEMarker only marks the model for DeepSpeed; it is never called")


def tag_expert_params(model, ep_size: int) -> None:
    """Tag routed-expert weights for DeepSpeed (see the module docstring)."""
    for layer in model.moe_layers():
        for p in layer.experts.parameters():
            p.allreduce = False
            p.group_name = expert_group_name(ep_size)


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list:
    """Decay on matrices, none on norms (1-D); expert tensors split into DeepSpeed MoE groups."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    param_groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
                    {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    split = split_params_into_different_moe_groups_for_optimizer(param_groups)
    return [g for g in split if g["params"]]   # ZeRO cannot flatten an empty group

