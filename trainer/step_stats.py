"""Training statistics for logging, summed locally over micro-batches and steps, reduced across
ranks once per log window (one all-reduce of the named sums, concatenated), then turned into the
metrics' numbers. Nothing here feeds back into training (the TC expert bias has its own owner,
trainer/expert_bias.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from model.diffusion import loss_by_ratio_bin

NUM_BINS = 10


def as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


@dataclass
class WindowStats:
    """One log window's statistics, summed over every rank; plain numbers, the same on all ranks."""
    loss: float
    z_loss: float
    aux_loss: float
    mean_k: float
    masked_per_step: float          # masked tokens per optimizer step (the head's FLOPs)
    assignments_per_step: float     # routed (token, expert) pairs per step (the experts' FLOPs)
    drop: list                      # per MoE layer
    load: torch.Tensor              # [layers, E] tokens per expert
    bin_loss: list                  # validation-style ELBO per mask-ratio bin (None where empty)
    source_loss: list               # data mixtures: ELBO over each source's sequences (None where none)
    step_s: float                   # mean over ranks of the mean step time
    rank_spread_s: float            # slowest minus fastest rank
    wait_frac: float                # this rank's share of step time spent waiting for data
    grad_norm: Optional[float]


class StepStats:
    def __init__(self, num_moe_layers: int, num_experts: int, num_sources: int = 0):
        self.L, self.E, self.S = num_moe_layers, num_experts, num_sources
        self.reset()

    def reset(self) -> None:
        # allocated on the first micro-batch's device: adding there needs no host sync
        self.sums: Optional[dict] = None
        self.steps, self.step_seconds, self.wait_seconds, self.grad_norms = 0, 0.0, 0.0, []

    def _zeros(self, device) -> dict:
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)   # noqa: E731
        return {"loss": z(()), "micro_batches": z(()), "z_loss": z(()), "aux_loss": z(()), "mean_k": z(()),
                "masked": z(()), "assignments": z(()), "drop": z(self.L), "load": z(self.L, self.E),
                "bin_num": z(NUM_BINS), "bin_cnt": z(NUM_BINS),
                "src_num": z(self.S), "src_cnt": z(self.S)}

    def add_micro(self, fwd, source_ids=None) -> None:
        """One micro-batch's TrainingForward (and, in a data mixture, each row's source id). Everything stays a tensor on the model's device: no
        .item() or .cpu() here, so on a GPU the host never waits for the micro-batch to finish
        (one sync per log window, in reduce())."""
        rec, moe = fwd.diffusion, fwd.output.moe
        loss = as64(rec.loss)
        if self.sums is None:
            self.sums = self._zeros(loss.device)
        s = self.sums
        s["loss"] += loss
        s["micro_batches"] += 1
        s["masked"] += as64(rec.mask_BL.sum())
        if moe:   # a dense model's MoE statistics stay zero
            layer = lambda name: torch.stack([as64(getattr(st, name)) for st in moe])   # noqa: E731
            s["z_loss"] += layer("z_loss").mean()
            s["aux_loss"] += layer("aux_loss").mean()
            s["mean_k"] += layer("mean_k").mean()
            s["assignments"] += layer("assignments").sum()
            s["drop"] += layer("drop_frac")
            s["load"] += layer("tokens_per_expert")
        num, cnt = loss_by_ratio_bin(rec, NUM_BINS)
        s["bin_num"] += num
        s["bin_cnt"] += cnt
        if self.S and source_ids is not None:
            num, cnt = loss_by_group(rec, source_ids.to(loss.device), self.S)
            s["src_num"] += num
            s["src_cnt"] += cnt

    def add_step(self, seconds: float, wait_seconds: float, grad_norm) -> None:
        self.steps += 1
        self.step_seconds += seconds
        self.wait_seconds += wait_seconds
        if grad_norm is not None:
            self.grad_norms.append(float(grad_norm))

    def reduce(self, device) -> WindowStats:
        """Collective: sums every rank's window."""
        sums = self.sums if self.sums is not None else self._zeros(device)
        names = list(sums)
        flat = torch.cat([sums[n].reshape(-1) for n in names])
        times = torch.tensor([self.step_seconds / max(self.steps, 1)], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            flat = flat.to(device)
            dist.all_reduce(flat)
            every = [torch.zeros_like(times, device=device) for _ in range(dist.get_world_size())]
            dist.all_gather(every, times.to(device))
            times = torch.cat(every)
        parts = flat.cpu().split([sums[n].numel() for n in names])
        tot = {n: p.view(sums[n].shape) for n, p in zip(names, parts)}
        micro, steps, times = max(float(tot["micro_batches"]), 1.0), max(self.steps, 1), times.cpu()
        return WindowStats(
            loss=float(tot["loss"]) / micro, z_loss=float(tot["z_loss"]) / micro,
            aux_loss=float(tot["aux_loss"]) / micro, mean_k=float(tot["mean_k"]) / micro,
            masked_per_step=float(tot["masked"]) / steps, assignments_per_step=float(tot["assignments"]) / steps,
            drop=(tot["drop"] / micro).tolist(), load=tot["load"],
            bin_loss=[float(n / c) if c > 0 else None for n, c in zip(tot["bin_num"], tot["bin_cnt"])],
            source_loss=[float(n / c) if c > 0 else None for n, c in zip(tot["src_num"], tot["src_cnt"])],
            step_s=float(times.mean()), rank_spread_s=float(times.max() - times.min()),
            wait_frac=self.wait_seconds / max(self.step_seconds, 1e-9),
            grad_norm=sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else None)


def loss_by_group(rec, group_B: torch.Tensor, num_groups: int) -> tuple:
    """ELBO numerator (sum of CE / r_b) and maskable-token count per group of sequences (a data
    mixture's sources), summable across micro-batches and ranks, as loss_by_ratio_bin does per bin."""
    r_B = rec.ratio_B.clamp_min(1e-6)
    seq_num_B = (rec.nll_BL.sum(1) / r_B).double()
    seq_tok_B = torch.round(rec.mask_BL.sum(1) / r_B).double()   # maskable per sequence
    num = torch.zeros(num_groups, dtype=torch.float64, device=seq_num_B.device).index_add_(0, group_B, seq_num_B)
    cnt = torch.zeros(num_groups, dtype=torch.float64, device=seq_num_B.device).index_add_(0, group_B, seq_tok_B)
    return num, cnt


def load_cv(load_E: torch.Tensor) -> float:
    """Coefficient of variation of tokens per expert: 0 for perfectly balanced experts."""
    load_E = load_E.double()
    return float(load_E.std(unbiased=False) / load_E.mean().clamp_min(1e-12))
