"""Decode speed of the fine-tuned arms, side by side in one process, and where it comes from.

Every arm decodes the same prompts with the same sampler settings (evaluation/sample.py, greedy).
Timing: benchmarks/common.time_interleaved (warm-up rounds, then rounds that run every arm once in
a rotated order, median per arm), tokens/s = prompts x gen_length / seconds, ratio to TC.
Where it comes from: one more, untimed decode per arm with a forward hook that reads the model's
own MoE statistics (ModelOutput.moe, one MoEStats per layer per forward): experts applied per
token (`mean_k`, the capacity actually used; FLOPs follow it) and the load balance max/mean of
tokens per expert (1.0 for EC by construction; for TC the busiest expert sets a GPU's time).
"""
from __future__ import annotations

import statistics

import torch

from benchmarks.common import median_ms, time_interleaved
from evaluation.generation_tasks import load_generation_jsonl, prompt_ids
from evaluation.sample import SampleConfig, generate


class MoERecorder:
    """Collects per-forward, per-layer MoE numbers from the model's output while attached."""

    def __init__(self, model):
        self.mean_k, self.balance, self.assignments, self.tokens = [], [], [], []
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        for s in output.moe:   # one MoEStats per MoE layer
            load_E = s.tokens_per_expert.float()
            self.mean_k.append(float(s.mean_k))
            self.balance.append(float(load_E.max() / load_E.mean().clamp_min(1e-9)))
            self.assignments.append(float(s.assignments))

    def summary(self) -> dict:
        self.handle.remove()
        return {"mean_experts_per_token": statistics.fmean(self.mean_k),
                "load_max_over_mean": statistics.fmean(self.balance),
                "load_max_over_mean_worst": max(self.balance),
                "routed_assignments_per_forward_layer": statistics.fmean(self.assignments)}


def decode_comparison(models: dict, tok, heldout_path: str, n_prompts: int, gen_length: int, steps: int,
                      warmup: int, repeat: int, baseline: str = "tc_ft") -> dict:
    """models: arm name -> model (eval mode). Returns {"rows": [...], "settings": {...}}."""
    items = load_generation_jsonl(heldout_path, limit=n_prompts)
    sc = SampleConfig(gen_length=gen_length, steps=steps, temperature=0.0)
    any_model = next(iter(models.values()))
    prompts = [prompt_ids(any_model, tok, it, gen_length) for it in items]
    forwards = {}
    stats = {}
    for name, model in models.items():   # untimed: the statistics, and the forwards per decode
        rec = MoERecorder(model)
        forwards[name] = generate(model, prompts, sc).forward_passes
        stats[name] = rec.summary()
    calls = {name: (lambda m=model: generate(m, prompts, sc)) for name, model in models.items()}
    times, loads, discarded = time_interleaved(calls, warmup, repeat, torch.device("cpu"))
    n_tokens = len(prompts) * gen_length
    base_tps = n_tokens / (median_ms(times[baseline]) / 1e3)
    rows = []
    for name in models:
        ms = median_ms(times[name])
        tps = n_tokens / (ms / 1e3)
        rows.append({"arm": name, "decode_ms": ms, "tokens_per_s": tps, "ratio_to_tc": tps / base_tps,
                     "forward_passes": forwards[name], "times_s": times[name], **stats[name]})
    return {"rows": rows, "settings": {"prompts": len(prompts), "gen_length": gen_length, "steps": steps,
                                       "warmup": warmup, "repeat": repeat, "threads": torch.get_num_threads(),
                                       "foreign_cores_per_round": loads, "discarded_rounds": discarded}}
