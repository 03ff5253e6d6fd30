"""Training statistics, summed locally over micro-batches and steps, reduced across ranks once per
log window (one all-reduce of one packed vector), then turned into the named metrics.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from model.diffusion import loss_by_ratio_bin

NUM_BINS = 10


class StepStats:
    def __init__(self, num_moe_layers: int, num_experts: int):
        self.L, self.E = num_moe_layers, num_experts
        self.reset()

    def reset(self) -> None:
        self.scalars = torch.zeros(7, dtype=torch.float64)   # see add()
        self.drop = torch.zeros(self.L, dtype=torch.float64)
        self.load = torch.zeros(self.L, self.E, dtype=torch.float64)
        self.bin_num = torch.zeros(NUM_BINS, dtype=torch.float64)
        self.bin_cnt = torch.zeros(NUM_BINS, dtype=torch.float64)
        self.steps, self.step_seconds, self.wait_seconds, self.grad_norms = 0, 0.0, 0.0, []

    def add_micro(self, rec, out) -> None:
        """One micro-batch's loss record and model output (tensors, detached here)."""
        moe = out.moe
        mean = (lambda xs: float(sum(float(x) for x in xs) / len(xs))) if moe else (lambda xs: 0.0)
        self.scalars += torch.tensor([
            float(rec.loss.detach()), 1.0,                                    # loss sum, micro count
            mean([s.z_loss for s in moe]), mean([s.aux_loss for s in moe]),   # per-layer means
            mean([s.mean_k for s in moe]),
            float(rec.mask_BL.sum()),                                          # masked tokens
            float(sum(float(s.assignments) for s in moe)),                    # routed assignments
        ], dtype=torch.float64)
        for i, s in enumerate(moe):
            self.drop[i] += float(s.drop_frac)
            self.load[i] += s.tokens_per_expert.detach().double().cpu()
        num, cnt = loss_by_ratio_bin(rec, NUM_BINS)
        self.bin_num += num.cpu()
        self.bin_cnt += cnt.cpu()

    def add_step(self, seconds: float, wait_seconds: float, grad_norm) -> None:
        self.steps += 1
        self.step_seconds += seconds
        self.wait_seconds += wait_seconds
        if grad_norm is not None:
            self.grad_norms.append(float(grad_norm))

    def reduce(self, device) -> dict:
        """Collective: sums every rank's window; returns plain floats (same on all ranks)."""
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
