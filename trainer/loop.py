"""The training run, top to bottom: checks, set-up, resume, then per optimizer step: micro-batches
(forward, backward), optimizer step, expert-bias update, metrics, evaluation, checkpoint, and a
preemption check. Returns the process exit status (0, or a preemption code).
"""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist

from model import DiffusionTransformer
from trainer.data import PackedLoader, check_vocab, fixed_eval_batches

from . import checkpoint as ckpt
from model.config import ConfigError

from .config import RunConfig, save_config
from .ds_config import load_ds_config, resolve_ds_config
from .evaluate import evaluate
from .flops import device_peak_tflops, train_flops
from .inference import load_tokenizer
from .mc_eval import evaluate_tasks
from .metrics import build_metrics
from .noise import global_batch_noise
from .objective import DiffusionObjective
from .parallel import (MoEMarker, create_expert_groups, expert_data_parallel_group, init_distributed,
                       optimizer_param_groups, tag_expert_params)
from .preemption import PreemptionWatcher, comm_device
from .schedule import build_scheduler
from .step_stats import StepStats, load_cv

log = logging.getLogger("ecdlm")


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)


def preflight(cfg: RunConfig, ds_config_path: str) -> dict:
    """Everything checkable before processes talk to each other: fail fast, name the problem."""
    ds_raw = load_ds_config(ds_config_path)
    world = int(os.environ.get("WORLD_SIZE", "1"))   # known before init under every launcher but MPI
    if cfg.moe.router != "dense" and world % cfg.moe.ep_size:
        raise ConfigError(f"moe.ep_size={cfg.moe.ep_size} must divide the world size {world}")
    resolve_ds_config(ds_raw, cfg, world, bf16=False, has_moe=cfg.moe.router != "dense", src=ds_config_path)
    for split in ("train", "val"):
        if not os.path.exists(os.path.join(cfg.data.path, split, "meta.json")):
            raise FileNotFoundError(f"data.path={cfg.data.path} has no prepared {split} split; run "
                                    f"`python -m trainer.data prepare --out {cfg.data.path}` first")
    check_vocab(cfg.data.path, cfg.model.vocab_size, cfg.model.pad_id, cfg.model.mask_id, data_path=cfg.data.path)
    return ds_raw


def build_optimizer(param_groups: list, cfg: RunConfig, ds: dict):
    o = cfg.optim
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam   # optimizer state lives on the CPU
        return DeepSpeedCPUAdam(param_groups, adamw_mode=True, **kw)
    # fused on CPU too: one pass over memory instead of about ten (4x faster for 8M fp32 params)
    return torch.optim.AdamW(param_groups, fused=True, **kw)


@dataclass
class Session:
    """Everything a training run holds after set-up."""
    cfg: RunConfig
    engine: object
    model: DiffusionTransformer
    scheduler: object
    loader: PackedLoader
    val_batches: list
    device: torch.device
    rank: int
    world: int
    ep_size: int
    ep_rank: int
    expert_dp_rank: int
    start_step: int = 0

    @property
    def run_dir(self) -> str:
        return self.cfg.run_dir

    def client_state(self, step: int) -> dict:
        t = self.cfg.train
        return {"step": step, "tokens": step * t.global_batch_size * t.seq_len,
                "loader": self.loader.state_dict(), "layout": {"world_size": self.world, "ep_size": self.ep_size}}

    def save(self, step: int) -> str:
        return ckpt.save_checkpoint(self.engine, self.model, self.run_dir, step, self.client_state(step),
                                    rank=self.rank, ep_rank=self.ep_rank, ep_size=self.ep_size,
                                    expert_dp_rank=self.expert_dp_rank, keep_last=self.cfg.train.keep_last)

    def load(self, path: str) -> int:
        client = ckpt.load_checkpoint(self.engine, self.model, path, rank=self.rank, ep_rank=self.ep_rank,
                                      ep_size=self.ep_size)
        self.loader.load_state_dict(client["loader"])
        self.start_step = client["step"]
        return self.start_step


def setup(cfg: RunConfig, ds_config_path: str) -> Session:
    """Checks, process groups, model, DeepSpeed engine, data, and resume."""
    ds_raw = preflight(cfg, ds_config_path)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    setup_logging(rank)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    has_moe = cfg.moe.router != "dense"
    ds = resolve_ds_config(ds_raw, cfg, world, bf16=bf16, has_moe=has_moe, src=ds_config_path)
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        with open(os.path.join(cfg.run_dir, "ds_config.json"), "w") as f:
            json.dump(ds, f, indent=2)
    dist.barrier()

    ep_size = cfg.moe.ep_size if has_moe else 1
    ep_group = create_expert_groups(ep_size) if has_moe else None
    model = DiffusionTransformer(cfg.model_config(), ep_group if ep_size > 1 else None, seed=cfg.train.seed)
    marker = None
    if has_moe:
        tag_expert_params(model, ep_size)
        marker = MoEMarker(cfg.moe.num_experts, ep_size)
    objective = DiffusionObjective(model, marker)
    optimizer = build_optimizer(optimizer_param_groups(objective, cfg.optim.weight_decay), cfg, ds)
    scheduler = build_scheduler(optimizer, cfg)
    engine, _, _, scheduler = deepspeed.initialize(model=objective, optimizer=optimizer,
                                                   lr_scheduler=scheduler, config=ds, dist_init_required=False)
    t = cfg.train
    loader = PackedLoader(os.path.join(cfg.data.path, "train"), t.seq_len, t.global_batch_size,
                          t.micro_batch_size, rank, world, t.seed, prefetch=cfg.data.prefetch)
    val_batches = fixed_eval_batches(os.path.join(cfg.data.path, "val"), t.seq_len, cfg.eval.batch_size,
                                     cfg.eval.batches)
    session = Session(cfg, engine, engine.module.model, scheduler, loader, val_batches, device, rank, world,
                      ep_size, dist.get_rank(ep_group) if ep_group is not None else 0,
                      dist.get_rank(expert_data_parallel_group(ep_size)) if has_moe else rank)
    found = [ckpt.find_checkpoint(cfg.run_dir, t.resume) if rank == 0 else None]
    dist.broadcast_object_list(found, src=0)   # one decision for all ranks
    if found[0]:
        session.load(found[0])
        log.info("resumed from %s at step %d", found[0], session.start_step)
    return session


def train_step(s: Session, step: int, stats: StepStats, update_bias: bool, cdev) -> None:
    """One optimizer step: every micro-batch forward and backward, the step, the bias update."""
    t = s.cfg.train
    u_G, token_u_GL = global_batch_noise(t.seed, step, t.global_batch_size, t.seq_len,
                                         s.cfg.diffusion.low_discrepancy)
    layers = s.model.moe_layers()
    step_load = torch.zeros(len(layers), s.cfg.moe.num_experts, dtype=torch.float64, device=s.device)
    for _ in range(s.loader.grad_accum_steps):
        mb = s.loader.next_micro_batch()
        idx = mb.global_offsets
        loss, rec, out = s.engine(mb.tokens.to(s.device), u_G[idx].to(s.device), token_u_GL[idx].to(s.device))
        s.engine.backward(loss)
        s.engine.step()   # DeepSpeed steps the optimizer only at the accumulation boundary
        micro_load = stats.add_micro(rec, out)   # [layers, E], on the device: no host sync
        if update_bias:
            step_load += micro_load
    if update_bias:   # once per optimizer step, with the global load, identically on every rank
        step_load = step_load.to(cdev)
        dist.all_reduce(step_load)
        for layer, load in zip(layers, step_load):
            layer.update_expert_bias(load.to(s.device))


def train(s: Session) -> int:
    """The loop. Returns the exit status: 0, or a preemption code after a checkpoint."""
    cfg, t = s.cfg, s.cfg.train
    G, L = t.global_batch_size, t.seq_len
    metrics, _ = build_metrics(cfg, s.run_dir, s.rank, s.start_step)
    counts = cfg.model_config().param_counts()
    log.info("params: %.2fM total, %.2fM active per token | world %d, ep %d, grad accum %d | "
             "%d tokens per step | run dir %s", counts["total"] / 1e6, counts["active"] / 1e6, s.world,
             s.ep_size, s.loader.grad_accum_steps, G * L, s.run_dir)
    watcher = PreemptionWatcher()
    stats = StepStats(len(s.model.moe_layers()), cfg.moe.num_experts)
    peak = device_peak_tflops(t.peak_tflops)
    cdev = comm_device()
    update_bias = cfg.moe.router == "token_choice" and cfg.moe.bias_update_rate > 0
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
            train_step(s, step, stats, update_bias, cdev)
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


def metrics_row(cfg: RunConfig, r: dict, step: int, lr: float, world: int, peak, device,
                layer_ids: list) -> dict:
    t = cfg.train
    tokens_per_step = t.global_batch_size * t.seq_len
    flops = train_flops(cfg.model_config(), tokens_per_step, t.seq_len, r["masked_per_step"],
                        r["assignments_per_step"])
    tflops = flops / r["step_s"] / world / 1e12
    row = {"step": step, "tokens": step * tokens_per_step, "train/loss": r["loss"], "train/z_loss": r["z_loss"],
           "train/aux_loss": r["aux_loss"], "train/grad_norm": r["grad_norm"], "train/lr": lr,
           "moe/mean_k": r["mean_k"], "perf/tokens_per_s": tokens_per_step / r["step_s"],
           "perf/tflops_per_device": tflops, "perf/mfu": tflops / peak if peak else None,
           "perf/step_s": r["step_s"], "perf/rank_spread_s": r["rank_spread_s"],
           "perf/data_wait_frac": r["wait_frac"], "perf/max_mem_gb": max_memory_gb(device)}
    for j, v in enumerate(r["bin_loss"]):
        row[f"train/loss_bin/{j:02d}"] = v
    for i, drop, load in zip(layer_ids, r["drop"], r["load"]):
        row[f"moe/drop_frac/layer{i:02d}"] = drop
        row[f"moe/load_cv/layer{i:02d}"] = load_cv(load)
    return row


def max_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # KiB on Linux
