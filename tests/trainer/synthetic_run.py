"""A run directory in the trainer's own checkpoint format, written without a training job: a
tiny real DiffusionTransformer's weights as one rank's fragments, state.json, the COMPLETE
manifest, `latest` and checkpoints/zero_to_fp32.py, exactly as trainer/engine/checkpoint.py
lays them out. For the tools' tests (verification, fallback, export, consolidation), where a
DeepSpeed run would cost a minute and add nothing the format does not already fix."""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from model import DiffusionTransformer, from_dict
from model.config import ModelConfig
from rundir.checkpoint_store import WEIGHTS, FragmentWriter, write_json
from rundir.checkpoints import STATE, file_digest, tag_for, write_manifest
from trainer.engine.checkpoint import write_consolidation_script

ARCH = {"model": {"vocab_size": 32, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
        "moe": {"router": "token_choice", "num_experts": 4, "expert_hidden": 16, "k": 2, "renormalize": False}}


def tiny_cfg() -> ModelConfig:
    return from_dict(ModelConfig, ARCH)


def write_checkpoint(root: Path, step: int, cfg: ModelConfig) -> Path:
    """One checkpoint of a model seeded by its step; its weights split over two ranks' files."""
    ckpt = root / tag_for(step)
    state = DiffusionTransformer(cfg, seed=step).state_dict()
    ranks = [FragmentWriter(str(ckpt), r) for r in (0, 1)]
    for i, (name, t) in enumerate(state.items()):
        ranks[i % 2].add(name, WEIGHTS, list(t.shape), 0, t.reshape(-1))
    files = {}
    for w in ranks:
        files.update(w.write())
    record = {"step": step, "tokens": 0, "loader": {"global_batch_size": 4}, "adam_step": step,
              "scheduler": {"last_epoch": step}, "engine": {"global_steps": step, "global_samples": 4 * step,
                                                            "skipped_steps": 0},
              "layout": {"world_size": 2, "ep_size": 1, "zero_stage": 2, "micro_batch_size": 2},
              "model_config": json.loads(json.dumps(cfg, default=vars))}
    files[str(ckpt / STATE)] = write_json(str(ckpt / STATE), record)
    write_manifest(str(ckpt), step, {os.path.relpath(f, ckpt): d for f, d in files.items()}, healthy=True)
    return ckpt


def write_run(run_dir: Path, steps=(2, 4, 6)) -> dict:
    """{step: checkpoint directory} of a run with config.yaml, `latest` at the last step."""
    cfg = tiny_cfg()
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True)
    from evaluation.hf.ecdlm_format import sections
    (Path(run_dir) / "config.yaml").write_text(yaml.safe_dump(
        {**sections(cfg), "train": {"run_name": "synthetic", "output_dir": str(run_dir), "seq_len": 16},
         "data": {"path": str(Path(run_dir) / "no-data")}}, sort_keys=False))
    out = {s: write_checkpoint(root, s, cfg) for s in steps}
    (root / "latest").write_text(tag_for(steps[-1]) + "\n")
    write_consolidation_script(str(root))
    return out


def reseal(ckpt: Path) -> None:
    """Rewrite the manifest over the files as they now are: damage that the checksums cannot see."""
    manifest = json.loads((ckpt / "COMPLETE").read_text())
    files = {rel: file_digest(str(ckpt / rel)) for rel in manifest["files"] if os.path.lexists(ckpt / rel)}
    write_manifest(str(ckpt), manifest["step"], files, healthy=True)
