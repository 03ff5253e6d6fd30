"""Non-finite steps: noticed before the optimizer update, agreed across ranks, and skipped with
nothing changed.

DeepSpeed's ZeRO-1/2 optimizer (runtime/zero/stage_1_and_2.py) already knows how to skip a step:
with `check_grad_overflow` on, `step()` first asks `has_overflow()` (any inf or NaN in this rank's
gradient partition, all-reduced MAX), and on overflow drops the gradients and returns before the
optimizer runs; the engine then does not step the LR schedule (engine._take_model_step). DeepSpeed
turns that check on only for fp16. Under fp32 and bf16 a NaN step went straight into the weights
and Adam's moments, and the norm it reported was -1 per parameter group
(runtime/utils.py: mask_nan_or_inf_with_val_inplace), which read as a plausible sqrt(3) = 1.732.

Here the check is on for every precision and `has_overflow` is replaced by `StepGuard.agree`,
the step's one small collective: this rank's [non-finite gradient, non-finite loss, *extra flags]
MAX-reduced over every rank. The extra flags are the preemption signals (trainer/preemption.py),
so the check adds no collective and no host sync to a step. Only on a non-finite step a second
all-reduce computes the real loss and gradient norm (nan or inf, never -1) for the metrics and
the stop message.

Optimizers without that hook (ZeRO-0 and ZeRO-3, dense models only) get the same agreement after
the step; a non-finite step there has already been applied and cannot be skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..distributed import comm_device


@dataclass
class StepHealth:
    """One optimizer step, the same on every rank."""
    nonfinite: bool = False          # a loss or a gradient of some rank was inf or NaN
    skipped: bool = False            # ... and the update was not applied (weights, Adam, LR unchanged)
    loss: Optional[float] = None     # global mean loss of the step: only computed when non-finite
    grad_norm: Optional[float] = None   # global gradient norm, unmasked: only when non-finite
    flags: list = field(default_factory=list)   # the extra flags, MAX over ranks


class StepGuard:
    def __init__(self, engine, extra_flags: Callable[[], list]):
        """`extra_flags()` returns this rank's other per-step flags (ints) to agree on."""
        self.engine, self.extra_flags = engine, extra_flags
        opt = engine.optimizer
        # DeepSpeedZeroOptimizer: ZeRO-1/2; its step() calls has_overflow before the update
        self.hooked = hasattr(opt, "check_grad_overflow") and hasattr(opt, "has_overflow_partitioned_grads_serial")
        if self.hooked:
            opt.check_grad_overflow = True
            opt.has_overflow = self.agree   # the instance attribute shadows the method
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.micro, self.health = None, 0, None

    def add_micro(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss, summed on its device (no host sync)."""
        loss = loss.detach().to(torch.float64)
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.micro += 1

    def agree(self, partition_gradients: bool = True) -> bool:
        """Collective, at the accumulation boundary (called by ZeRO's step() in place of its own
        has_overflow). True: skip this step."""
        opt = self.engine.optimizer
        if opt.cpu_offload:   # offload tracks its own flag while copying gradients to the CPU
            grads_bad = torch.tensor(float(opt.local_overflow))
        else:
            grads_bad = opt.has_overflow_partitioned_grads_serial().reshape(()).to(torch.float64)
        health = self._agree(grads_bad)
        health.skipped = health.nonfinite
        self.health = health
        return health.nonfinite

    def finish_step(self) -> StepHealth:
        """After the step's engine.step() calls: the agreed health (and flags) of the step."""
        if self.health is None:   # no ZeRO hook: agree now; the update has been applied
            norm = self.engine.get_global_grad_norm()
            bad = norm is None or not math.isfinite(float(norm)) or float(norm) < 0
            self.health = self._agree(torch.tensor(float(bad and norm is not None)))
        health = self.health
        self._reset()
        return health

    def _agree(self, grads_bad: torch.Tensor) -> StepHealth:
        dev = comm_device() if dist.is_initialized() else torch.device("cpu")
        loss = self.loss_sum if self.loss_sum is not None else torch.zeros((), dtype=torch.float64)
        local = torch.cat([torch.stack([grads_bad.to(dev, torch.float64),
                                        (~torch.isfinite(loss)).to(dev, torch.float64)]),
                           torch.tensor([float(f) for f in self.extra_flags()], dtype=torch.float64).to(dev)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
        grads, loss_bad, *flags = local.tolist()
        health = StepHealth(nonfinite=bool(grads or loss_bad), flags=[int(f) for f in flags])
        if health.nonfinite:
            health.loss, health.grad_norm = self._values(loss, dev)
        return health

    def _values(self, loss_sum: torch.Tensor, dev) -> tuple:
        """Collective (every rank agreed the step is non-finite): the step's mean loss and the
        gradient norm without DeepSpeed's -1 substitution. Each element of a ZeRO partition lives on
        exactly one rank (expert partitions too: different experts per expert-parallel rank), so the
        sum of every rank's squared partition is the squared global norm."""
        sq = torch.zeros((), dtype=torch.float64, device=dev)
        for g in self._partition_grads():
            sq += g.detach().to(dev, torch.float64).square().sum()
        if not self.hooked:   # no partitions to read: DeepSpeed's own (masked) norm is all there is
            sq = torch.tensor(float("nan"), dtype=torch.float64, device=dev)
        vals = torch.stack([loss_sum.to(dev, torch.float64), torch.tensor(float(self.micro), dtype=torch.float64,
                                                                          device=dev), sq])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vals)
        loss, micro, sq = vals.tolist()
        return loss / max(micro, 1.0), math.sqrt(sq)   # sqrt keeps nan and inf

    def _partition_grads(self) -> list:
        opt = self.engine.optimizer
        if not self.hooked:
            return []
        if opt.cpu_offload:
            return [p.grad for p in opt.single_partition_of_fp32_groups if p.grad is not None]
        return [g for i in range(len(opt.bit16_groups)) for g in (opt.averaged_gradients.get(i) or [])
                if g is not None]


def describe(health: StepHealth) -> str:
    """'loss nan, grad norm inf' for the log line."""
    fmt = lambda v: "unknown" if v is None else f"{v:.6g}"   # noqa: E731
    return f"loss {fmt(health.loss)}, grad norm {fmt(health.grad_norm)}"
