"""The training loop, top to bottom: per optimizer step, micro-batches (forward, backward), the
optimizer step, the expert-bias update, metrics, evaluation, checkpoint, and a preemption check.
Set-up lives in trainer/session.py. Returns the process exit status (0, or a preemption code).
"""
from __future__ import annotations

import logging
import os
import resource
import time

import torch

from evaluation.loading import load_tokenizer
from evaluation.tasks import evaluate_tasks

from .config import RunConfig
from .distributed import comm_device
from .expert_bias import ExpertBiasBalancer
from .flops import device_peak_tflops, train_flops
from .metrics import build_metrics
from .noise import global_batch_noise
from .preemption import PreemptionWatcher
from .session import Session, setup
from .step_stats import StepStats, WindowStats, load_cv
from .validation import evaluate

log = logging.getLogger("ecdlm")


def train_step(s: Session, step: int, stats: StepStats, bias: ExpertBiasBalancer) -> None:
    """One optimizer step: every micro-batch forward and backward, the step, the bias update."""
    t = s.cfg.train
    u_G, token_u_GL = global_batch_noise(t.seed, step, t.global_batch_size, t.seq_len,
                                         s.cfg.diffusion.low_discrepancy)
    for _ in range(s.loader.grad_accum_steps):
        mb = s.loader.next_micro_batch()
        idx = mb.global_offsets
        fwd = s.engine(mb.tokens.to(s.device), u_G[idx].to(s.device), token_u_GL[idx].to(s.device))
        s.engine.backward(fwd.loss)
        s.engine.step()   # DeepSpeed steps the optimizer only at the accumulation boundary
        stats.add_micro(fwd)   # on the device: no host sync
        bias.add_micro(fwd)
    bias.step()   # once per optimizer step, with the global load, identically on every rank


def train(s: Session) -> int:
    """The loop. Returns the exit status: 0, or a preemption code after a checkpoint."""
    cfg, t = s.cfg, s.cfg.train
    G, L = t.global_batch_size, t.seq_len
    metrics = build_metrics(cfg, s.run_dir, s.rank, s.start_step)
    counts = cfg.model_config.param_counts()
    log.info("params: %.2fM total, %.2fM active per token | world %d, ep %d, grad accum %d | "
             "%d tokens per step | run dir %s", counts["total"] / 1e6, counts["active"] / 1e6, s.world,
             s.ep_size, s.loader.grad_accum_steps, G * L, s.run_dir)
    watcher = PreemptionWatcher()
    stats = StepStats(len(s.model.moe_layers()), cfg.moe.num_experts)
    peak = device_peak_tflops(t.peak_tflops)
    cdev = comm_device()
    bias = ExpertBiasBalancer(s.model, s.device, cdev)
    layer_ids = [layer.layer_idx for layer in s.model.moe_layers()]
    step, exit_code = s.start_step, 0

    task_tokenizer = load_tokenizer(cfg.data.path) if cfg.eval.tasks else None

    def run_eval() -> None:
        row = evaluate(s.model, s.val_batches, cfg, s.rank, s.world, s.device)
        metrics.log({"step": step, "tokens": step * G * L, **row})

    def run_tasks() -> None:   # collective: every rank calls it every step; no-op unless a task is due
        row = evaluate_tasks(s.model, cfg.eval.tasks, task_tokenizer, step, s.rank, s.world)
        if row:
            metrics.log({"step": step, "tokens": step * G * L, **row})

    if step == 0:
        run_eval()   # the untrained baseline, so every run's curve starts at the same place
    try:
        while step < t.max_steps:
            t0, wait0 = time.time(), s.loader.wait_seconds
            lr = s.scheduler.get_last_lr()[0]
            train_step(s, step, stats, bias)
            if s.device.type == "cuda":
                torch.cuda.synchronize()
            step += 1
            stats.add_step(time.time() - t0, s.loader.wait_seconds - wait0, s.engine.get_global_grad_norm())
            if step % t.log_every == 0 or step == t.max_steps:
                metrics.log(metrics_row(cfg, stats.reduce(cdev), step, lr, s.world, peak, s.device, layer_ids))
                stats.reset()
            if step % t.eval_every == 0 or step == t.max_steps:
                run_eval()
            if cfg.eval.tasks:
                run_tasks()
            exit_code = watcher.agreed_exit_code()
            if exit_code or step % t.save_every == 0 or step == t.max_steps:
                log.info("saved checkpoint %s", s.save(step))
            if exit_code:
                log.warning("preemption signal: checkpointed at step %d, exiting with %d", step, exit_code)
                break
    finally:
        s.loader.close()
        metrics.close()
    if s.rank == 0:
        log.info("run directory: %s", os.path.abspath(s.run_dir))
    return exit_code


def run(cfg: RunConfig, ds_config_path: str) -> int:
    return train(setup(cfg, ds_config_path))


def metrics_row(cfg: RunConfig, r: WindowStats, step: int, lr: float, world: int, peak, device,
                layer_ids: list) -> dict:
    t = cfg.train
    tokens_per_step = t.global_batch_size * t.seq_len
    flops = train_flops(cfg.model_config, tokens_per_step, t.seq_len, r.masked_per_step, r.assignments_per_step)
    tflops = flops / r.step_s / world / 1e12
    row = {"step": step, "tokens": step * tokens_per_step, "train/loss": r.loss, "train/z_loss": r.z_loss,
           "train/aux_loss": r.aux_loss, "train/grad_norm": r.grad_norm, "train/lr": lr,
           "moe/mean_k": r.mean_k, "perf/tokens_per_s": tokens_per_step / r.step_s,
           "perf/tflops_per_device": tflops, "perf/mfu": tflops / peak if peak else None,
           "perf/step_s": r.step_s, "perf/rank_spread_s": r.rank_spread_s,
           "perf/data_wait_frac": r.wait_frac, "perf/max_mem_gb": max_memory_gb(device)}
    for j, v in enumerate(r.bin_loss):
        row[f"train/loss_bin/{j:02d}"] = v
    for i, drop, load in zip(layer_ids, r.drop, r.load):
        row[f"moe/drop_frac/layer{i:02d}"] = drop
        row[f"moe/load_cv/layer{i:02d}"] = load_cv(load)
    return row


def max_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # KiB on Linux
