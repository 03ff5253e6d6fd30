"""Set-up of a training run: checks that need no process group (preflight), process groups, the
DeepSpeed engine, data, and resume. Returns a Session, everything the loop needs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model import DiffusionTransformer
from model.config import ConfigError
from trainer.data import (PackedLoader, SFTLoader, TokenStore, check_vocab, data_format, fixed_eval_batches,
                          fixed_sft_eval_batches)
from trainer.data.mixture import (MixtureLoader, check_sources, fixed_source_eval_batches, normalization_note,
                                  resolve_sources)
from trainer.data.sft_loader import SFTExamples

from rundir import checkpoints
from rundir.config import RunConfig, resolve_mode, save_config
from .engine import checkpoint as engine_ckpt
from .engine.build import build_engine
from .engine.ds_config import load_ds_config, resolve_ds_config
from .engine.cpu_threads import share_cpu_threads
from .engine.parallel import init_distributed
from .hooks import RunHooks
from .init_weights import check_init_source

log = logging.getLogger("ecdlm")


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)


def preflight(cfg: RunConfig, ds_config_path: str, hooks: RunHooks = RunHooks()) -> tuple:
    """Everything checkable before processes talk to each other: fail fast, name the problem.
    Every rank runs it on the same files, so every rank reaches the same verdict and the same
    checkpoint to resume from. Returns (the config with train.mode resolved from the data,
    DeepSpeed JSON, checkpoint to resume or None)."""
    ds_raw = load_ds_config(ds_config_path)
    world = int(os.environ.get("WORLD_SIZE", "1"))   # known before init under every launcher but MPI
    if cfg.moe.router != "dense" and world % cfg.moe.ep_size:
        raise ConfigError(f"moe.ep_size={cfg.moe.ep_size} must divide the world size {world}")
    resolve_ds_config(ds_raw, cfg, world, bf16=False, has_moe=cfg.moe.router != "dense", src=ds_config_path)
    if cfg.data.mixture:   # every source present, one tokenizer, one format; data.path: the first source's
        sources = resolve_sources(cfg.data.mixture)
        fmt = check_sources(sources, cfg.model.vocab_size, cfg.model.pad_id, cfg.model.mask_id)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=sources[0].path))
    else:
        for split in ("train", "val"):
            if not os.path.exists(os.path.join(cfg.data.path, split, "meta.json")):
                raise FileNotFoundError(f"data.path={cfg.data.path} has no prepared {split} split; run "
                                        f"`python -m trainer.data prepare --out {cfg.data.path}` first")
        check_vocab(cfg.data.path, cfg.model.vocab_size, cfg.model.pad_id, cfg.model.mask_id, data_path=cfg.data.path)
        fmt = data_format(cfg.data.path)
    cfg = resolve_mode(cfg, fmt)   # before the resume check: it compares configs
    for path in data_dirs(cfg):
        for split in ("train", "val"):   # every file present and as long as meta.json says
            split_dir = os.path.join(path, split)
            TokenStore(split_dir) if cfg.train.mode == "pretrain" else SFTExamples(split_dir, cfg.train.seq_len)
    hooks.check(cfg)   # the in-training evaluation's files, before anything expensive
    stage = ds_raw.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2):
        raise ConfigError(f"{ds_config_path}: zero_optimization.stage={stage}; ecdlm's checkpoints need ZeRO "
                          f"stage 1 or 2 (ds_configs/zero1.json, zero2.json, zero2_offload.json)")
    resume = checkpoints.find_checkpoint(cfg.run_dir, cfg.train.resume)   # verifies manifests
    if resume:
        checkpoints.check_resumable(cfg, resume)
    elif cfg.init.source:
        check_init_source(cfg.init.source, cfg.model_config, hooks)
    return cfg, ds_raw, resume


def data_dirs(cfg: RunConfig) -> list:
    return [e.path for e in cfg.data.mixture] or [cfg.data.path]


@dataclass
class Session:
    """Everything a training run holds after set-up."""
    cfg: RunConfig
    engine: object
    model: DiffusionTransformer
    scheduler: object
    loader: PackedLoader
    val_batches: object   # a list of batches; for a data mixture {source name: list of batches}
    device: torch.device
    rank: int
    world: int
    ep_size: int
    ep_rank: int
    expert_dp_rank: int
    start_step: int = 0
    abandoned: tuple = ()   # checkpoints newer than the one resumed from (skipped as damaged, or
                            # past where `latest` was pointed back): pruning leaves them alone

    @property
    def run_dir(self) -> str:
        return self.cfg.run_dir

    layout: engine_ckpt.Layout = None

    def run_state(self, step: int) -> dict:
        t = self.cfg.train
        return {"step": step, "tokens": step * t.global_batch_size * t.seq_len, "loader": self.loader.state_dict()}

    def save(self, step: int, healthy: bool = True) -> str:
        return engine_ckpt.save_checkpoint(self.engine, self.model, self.run_dir, step, self.run_state(step),
                                           layout=self.layout, keep_last=self.cfg.train.keep_last,
                                           scheduler=self.scheduler, healthy=healthy, abandoned=self.abandoned)

    def load(self, path: str) -> int:
        state = engine_ckpt.load_checkpoint(self.engine, self.model, path, layout=self.layout,
                                            scheduler=self.scheduler)
        self.loader.load_state_dict(state["loader"])
        self.start_step = state["step"]
        change = engine_ckpt.layout_change(state, self.layout)
        if change:
            log.info(change)
        return self.start_step


def open_data(cfg: RunConfig, rank: int, world: int) -> tuple:
    """(train loader, fixed validation batches) for the run's mode: packed token streams for
    pretraining, one example per sequence with its prompt mask for supervised fine-tuning."""
    t = cfg.train
    if cfg.data.mixture:
        sources = resolve_sources(cfg.data.mixture)
        note = normalization_note(sources)
        if note:
            log.warning(note)
        log.info("data mixture: %s", ", ".join(f"{s.name} {s.weight:.4g} ({s.path})" for s in sources))
        loader = MixtureLoader(sources, "train", t.mode, t.seq_len, t.global_batch_size, t.micro_batch_size,
                               rank, world, t.seed, prefetch=cfg.data.prefetch)
        return loader, fixed_source_eval_batches(sources, t.mode, t.seq_len, cfg.eval.batch_size, cfg.eval.batches)
    train_dir, val_dir = (os.path.join(cfg.data.path, split) for split in ("train", "val"))
    Loader, eval_batches = ((SFTLoader, fixed_sft_eval_batches) if t.mode == "sft"
                            else (PackedLoader, fixed_eval_batches))
    loader = Loader(train_dir, t.seq_len, t.global_batch_size, t.micro_batch_size, rank, world, t.seed,
                    prefetch=cfg.data.prefetch)
    return loader, eval_batches(val_dir, t.seq_len, cfg.eval.batch_size, cfg.eval.batches)


def setup(cfg: RunConfig, ds_config_path: str, hooks: RunHooks = RunHooks()) -> Session:
    """Checks, process groups, model, DeepSpeed engine, data, and resume."""
    cfg, ds_raw, resume = preflight(cfg, ds_config_path, hooks)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    setup_logging(rank)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    threads = share_cpu_threads()   # after set_device: under NCCL its gather runs on this rank's GPU
    if threads and rank == 0:
        log.info(threads)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    ds = resolve_ds_config(ds_raw, cfg, world, bf16=bf16, has_moe=cfg.moe.router != "dense", src=ds_config_path)
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        with checkpoints.atomic_file(os.path.join(cfg.run_dir, "ds_config.json"), "w") as f:
            json.dump(ds, f, indent=2)
    dist.barrier()

    # a run with a checkpoint of its own resumes from it: a requeued fine-tuning job must not start over
    init_from = None if resume else cfg.init.source
    if resume and cfg.init.source:
        log.info("init.from=%s not used: resuming from the run's own checkpoint %s", cfg.init.source, resume)
    built = build_engine(cfg, ds, init_from=init_from, hooks=hooks)
    t = cfg.train
    loader, val_batches = open_data(cfg, rank, world)
    session = Session(cfg=cfg, engine=built.engine, model=built.model, scheduler=built.scheduler, loader=loader,
                      val_batches=val_batches, device=device, rank=rank, world=world, ep_size=built.ep_size,
                      ep_rank=built.ep_rank, expert_dp_rank=built.expert_dp_rank,
                      layout=engine_ckpt.Layout(world_size=world, ep_size=built.ep_size,
                                                zero_stage=ds["zero_optimization"]["stage"],
                                                micro_batch_size=t.micro_batch_size, rank=rank,
                                                ep_rank=built.ep_rank, expert_dp_rank=built.expert_dp_rank))
    if resume:
        session.abandoned = tuple(d for d in checkpoints.complete_checkpoints(os.path.join(cfg.run_dir, "checkpoints"))
                                  if os.path.basename(d) > os.path.basename(os.path.normpath(resume)))
        session.load(resume)
        log.info("resumed from %s at step %d", resume, session.start_step)
    return session
