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


from . import watchdog
from .hooks import RunHooks
from rundir.config import RunConfig
from .distributed import comm_device
from .engine.nonfinite import StepGuard, StepHealth, describe
from .engine.parallel import group_timeouts, set_comm_timeout
from .expert_bias import ExpertBiasBalancer
from .flops import device_peak_tflops, train_flops
from .metrics import build_metrics
from .noise import global_batch_noise
from .preemption import EXIT_DIVERGED, PreemptionWatcher
from .session import Session, setup
from .step_stats import StepStats, WindowStats, load_cv
from .validation import evaluate, evaluate_sources

log = logging.getLogger("ecdlm")


def train_step(s: Session, step: int, stats: StepStats, bias: ExpertBiasBalancer, guard: StepGuard) -> StepHealth:
    """One optimizer step: every micro-batch forward and backward, the step, the bias update.
    A step the ranks agree is non-finite is skipped whole: no update, no bias change."""
    t = s.cfg.train
    u_G, token_u_GL = global_batch_noise(t.seed, step, t.global_batch_size, t.seq_len,
                                         s.cfg.diffusion.low_discrepancy)
    for _ in range(s.loader.grad_accum_steps):
        mb = s.loader.next_micro_batch()
        idx = mb.global_offsets
        # SFT: the prompt mask (never masked, no loss); EOS fill is part of the response, so no pads
        prompt = None if mb.prompt_mask is None else mb.prompt_mask.to(s.device)
        fwd = s.engine(mb.tokens.to(s.device), u_G[idx].to(s.device), token_u_GL[idx].to(s.device),
                       prompt_BL=prompt)["forward"]
        guard.add_micro(fwd.loss)   # before engine.step(): the boundary's check reads it
        s.engine.backward(fwd.loss)
        s.engine.step()   # DeepSpeed steps the optimizer only at the accumulation boundary
        stats.add_micro(fwd, mb.source_ids)   # on the device: no host sync
        bias.add_micro(fwd)
    health = guard.finish_step()
    if health.skipped:
        bias.load = None   # the skipped step's expert load is dropped with its gradients
    else:
        bias.step()   # once per optimizer step, with the global load, identically on every rank
    return health


def train(s: Session, evaluate_tasks=None) -> int:
    """The loop. Returns the exit status: 0, a preemption code after a checkpoint, or
    EXIT_DIVERGED after a non-finite step the policy (train.nonfinite) does not skip.
    `evaluate_tasks(model, step, rank, world) -> row` is the in-training evaluation the entry point
    handed over (RunHooks.evaluate), called on every rank after every step, or None."""
    cfg, t = s.cfg, s.cfg.train
    G, L = t.global_batch_size, t.seq_len
    metrics = build_metrics(cfg, s.run_dir, s.rank, s.start_step)
    counts = cfg.model_config.param_counts()
    log.info("params: %.2fM total, %.2fM active per token | world %d, ep %d, grad accum %d | "
             "%d tokens per step | run dir %s", counts["total"] / 1e6, counts["active"] / 1e6, s.world,
             s.ep_size, s.loader.grad_accum_steps, G * L, s.run_dir)
    watcher = PreemptionWatcher()
    guard = StepGuard(s.engine, watcher.local_flags)   # carries the preemption flags: one collective a step
    skipped_in_row = skipped_in_window = 0
    healthy = True   # no non-finite step since the last save
    sources = getattr(s.loader, "sources", [])   # a data mixture's (trainer/data/mixture.py), else none
    stats = StepStats(len(s.model.moe_layers()), cfg.moe.num_experts, len(sources))
    peak = device_peak_tflops(t.peak_tflops)
    cdev = comm_device()
    bias = ExpertBiasBalancer(s.model, s.device, cdev)
    layer_ids = [layer.layer_idx for layer in s.model.moe_layers()]
    step, exit_code = s.start_step, 0

    def run_eval() -> None:
        row = (evaluate_sources(s.model, s.val_batches, {src.name: src.weight for src in sources}, cfg, s.rank,
                                s.world, s.device) if sources else
               evaluate(s.model, s.val_batches, cfg, s.rank, s.world, s.device))
        metrics.log({"step": step, "tokens": step * G * L, **row})

    def run_tasks() -> None:   # collective: every rank calls it every step; no-op unless a task is due
        row = evaluate_tasks(s.model, step, s.rank, s.world)
        if row:
            metrics.log({"step": step, "tokens": step * G * L, **row})

    if step == 0:
        run_eval()   # the untrained baseline, so every run's curve starts at the same place
    try:
        while step < t.max_steps:
            t0, wait0 = time.time(), s.loader.wait_seconds
            lr = s.scheduler.get_last_lr()[0]
            health = train_step(s, step, stats, bias, guard)
            if s.device.type == "cuda":
                torch.cuda.synchronize()
            step += 1
            watchdog.beat()
            if sources and s.rank == 0:
                for line in s.loader.new_epochs(step - 1, step):
                    log.info(line)
            # a skipped step's norm is ours (nan or inf): ZeRO computes none and keeps the last one
            stats.add_step(time.time() - t0, s.loader.wait_seconds - wait0,
                           health.grad_norm if health.nonfinite else s.engine.get_global_grad_norm())
            skipped_in_row = skipped_in_row + 1 if health.nonfinite else 0
            skipped_in_window += health.skipped
            healthy = healthy and not health.nonfinite
            if health.nonfinite:
                exit_code = nonfinite_verdict(t, step, health, skipped_in_row, s.rank)
            if step % t.log_every == 0 or step == t.max_steps or exit_code:
                window = stats.reduce(cdev)
                row = metrics_row(cfg, window, step, lr, s.world, peak, s.device, layer_ids)
                if sources:   # the per-source losses of the window, and the data read so far
                    row.update({f"train/loss/{src.name}": v
                                for src, v in zip(sources, window.source_loss)})
                    row.update(s.loader.accounting(step))
                metrics.log({**row, "train/skipped_steps": skipped_in_window})
                stats.reset()
                skipped_in_window = 0
            if exit_code:   # diverged: nothing is saved, the newest checkpoint predates it
                break
            if step % t.eval_every == 0 or step == t.max_steps:
                run_eval()
            if evaluate_tasks is not None:
                run_tasks()
            exit_code = watcher.agreed_exit_code(health.flags)
            if exit_code or step % t.save_every == 0 or step == t.max_steps:
                t_save = time.time()
                log.info("saved checkpoint %s", s.save(step, healthy=healthy))
                healthy = True
                watchdog.beat()   # a long save is progress too
                metrics.log({"step": step, "tokens": step * G * L, "perf/ckpt_save_s": time.time() - t_save})
            if exit_code:
                log.warning("preemption signal: checkpointed at step %d, exiting with %d", step, exit_code)
                break
    finally:
        s.loader.close()
        metrics.close()
    if s.rank == 0:
        log.info("run directory: %s", os.path.abspath(s.run_dir))
    return exit_code


def nonfinite_verdict(t, step: int, health: StepHealth, in_row: int, rank: int) -> int:
    """0 to go on after a non-finite step (already skipped), else EXIT_DIVERGED; one log line
    either way, from rank 0 (every rank reached the same verdict from the same agreed numbers)."""
    what = f"step {step}: non-finite {describe(health)}"
    if t.nonfinite == "stop" or not health.skipped or in_row > t.max_skipped_steps:
        why = ("train.nonfinite=stop" if t.nonfinite == "stop" else
               "the optimizer cannot skip steps" if not health.skipped else
               f"{in_row} non-finite steps in a row > train.max_skipped_steps={t.max_skipped_steps}")
        if rank == 0:
            log.error("%s; stopping with status %d (%s); no checkpoint is written after a non-finite step, "
                      "resume from the newest one with a lower optim.lr", what, EXIT_DIVERGED, why)
        return EXIT_DIVERGED
    if rank == 0:
        log.warning("%s; step skipped, weights and optimizer unchanged (%d in a row, stop after %d)", what, in_row,
                    t.max_skipped_steps)
    return 0


def run(cfg: RunConfig, ds_config_path: str, hooks: RunHooks = RunHooks()) -> int:
    """A whole training run; `hooks` carry what the entry point adds (in-training evaluation)."""
    set_comm_timeout(cfg.train.comm_timeout_s)   # before any process group exists
    session = setup(cfg, ds_config_path, hooks)
    log.info("collective timeouts: %s", ", ".join(f"{k} {v.total_seconds():g} s" for k, v in group_timeouts().items()))
    return train(session, hooks.evaluate)


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
