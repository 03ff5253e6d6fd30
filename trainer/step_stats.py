"""Training statistics, summed locally over micro-batches and steps, reduced across ranks once per
log window (one all-reduce of one packed vector), then turned into the named metrics.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from model.diffusion import loss_by_ratio_bin

NUM_BINS = 10
_PER_LAYER = ("z_loss", "aux_loss", "mean_k", "assignments", "drop_frac", "tokens_per_expert")   # MoEStats fields


def as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


class StepStats:
    def __init__(self, num_moe_layers: int, num_experts: int):
        self.L, self.E = num_moe_layers, num_experts
        self.reset()

    def reset(self) -> None:
        # allocated on the first micro-batch's device: adding there needs no host sync
        self.scalars = self.drop = self.load = self.bin_num = self.bin_cnt = None
        self.steps, self.step_seconds, self.wait_seconds, self.grad_norms = 0, 0.0, 0.0, []

    def _zeros(self, device) -> None:
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)   # noqa: E731
        self.scalars, self.drop, self.load = z(7), z(self.L), z(self.L, self.E)
        self.bin_num, self.bin_cnt = z(NUM_BINS), z(NUM_BINS)

    def add_micro(self, rec, out) -> Optional[torch.Tensor]:
        """One micro-batch's loss record and model output. Everything stays a tensor on the
        model's device: no .item() or .cpu() here, so on a GPU the host never waits for the
        micro-batch to finish (one sync per log window, in reduce()). Returns this micro-batch's
        tokens per expert, [layers, E] float64 (None without MoE layers), for the TC bias update."""
        loss = as64(rec.loss)
        if self.scalars is None:
            self._zeros(loss.device)
        if out.moe:
            per_layer = {name: torch.stack([as64(getattr(s, name)) for s in out.moe]) for name in _PER_LAYER}
            self.drop += per_layer["drop_frac"]
            self.load += per_layer["tokens_per_expert"]
        else:   # a dense model: its MoE statistics are zero
            per_layer = {name: loss.new_zeros(1) for name in _PER_LAYER}
        self.scalars += torch.stack([
            loss, torch.ones_like(loss),                                       # loss sum, micro count
            per_layer["z_loss"].mean(), per_layer["aux_loss"].mean(),          # per-layer means
            per_layer["mean_k"].mean(),
            as64(rec.mask_BL.sum()),                                           # masked tokens
            per_layer["assignments"].sum(),                                    # routed assignments
        ])
        num, cnt = loss_by_ratio_bin(rec, NUM_BINS)
        self.bin_num += num
        self.bin_cnt += cnt
        return per_layer["tokens_per_expert"] if out.moe else None

    def add_step(self, seconds: float, wait_seconds: float, grad_norm) -> None:
        self.steps += 1
        self.step_seconds += seconds
        self.wait_seconds += wait_seconds
        if grad_norm is not None:
            self.grad_norms.append(float(grad_norm))

    def reduce(self, device) -> dict:
        """Collective: sums every rank's window; returns plain floats (same on all ranks)."""
        if self.scalars is None:
            self._zeros(device)
        packed = torch.cat([self.scalars, self.drop, self.load.flatten(), self.bin_num, self.bin_cnt])
        times = torch.tensor([self.step_seconds / max(self.steps, 1)], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            packed = packed.to(device)
            dist.all_reduce(packed)
            every = [torch.zeros_like(times, device=device) for _ in range(dist.get_world_size())]
            dist.all_gather(every, times.to(device))
            times = torch.cat(every)
        packed, times = packed.cpu(), times.cpu()
        s = packed[:7]
        micro = max(float(s[1]), 1.0)
        o = 7
        drop = packed[o:o + self.L] / micro
        o += self.L
        load = packed[o:o + self.L * self.E].view(self.L, self.E)
        o += self.L * self.E
        bin_num, bin_cnt = packed[o:o + NUM_BINS], packed[o + NUM_BINS:o + 2 * NUM_BINS]
        steps = max(self.steps, 1)
        return {"loss": float(s[0]) / micro, "z_loss": float(s[2]) / micro, "aux_loss": float(s[3]) / micro,
                "mean_k": float(s[4]) / micro, "masked_per_step": float(s[5]) / steps,
                "assignments_per_step": float(s[6]) / steps, "drop": drop.tolist(), "load": load,
                "bin_loss": [float(n / c) if c > 0 else None for n, c in zip(bin_num, bin_cnt)],
                "step_s": float(times.mean()), "rank_spread_s": float(times.max() - times.min()),
                "wait_frac": self.wait_seconds / max(self.step_seconds, 1e-9),
                "grad_norm": sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else None}


def load_cv(load_E: torch.Tensor) -> float:
    """Coefficient of variation of tokens per expert: 0 for perfectly balanced experts."""
    load_E = load_E.double()
    return float(load_E.std(unbiased=False) / load_E.mean().clamp_min(1e-12))
