"""Loading a finished run on one process: its config, its weights (every expert local, from a
checkpoint of any parallel layout) and its tokenizer.

    model, cfg, tok = load_run("runs/tiny")          # newest complete checkpoint, eval mode
    ids = tok.encode("def f(x):")                    # no special tokens added
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


from model import DiffusionTransformer
from trainer.checkpoint_store import WEIGHTS, FragmentReader
from trainer.checkpoints import resolve_checkpoint
from trainer.config import load_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Tokenizer:
    """The run's sentencepiece model with the ids the tools need; encode adds no special tokens."""
    sp: object
    pad_id: int
    eod_id: int
    mask_id: int
    vocab_size: int

    def encode(self, text: str) -> list:
        return list(self.sp.encode(text))

    def decode(self, ids) -> str:
        """Text of `ids` up to the first end-of-document or pad token (the sampler fills a fixed
        length; what follows the document's end is not part of the answer)."""
        out = []
        for i in (int(t) for t in ids):
            if i in (self.eod_id, self.pad_id):
                break
            if i != self.mask_id:
                out.append(i)
        return self.sp.decode(out)


def resolve_path(path: str) -> str:
    """A path from a saved config: relative ones were relative to the training job's working
    directory, which is normally the repository root."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(REPO_ROOT, path)


def load_tokenizer(data_path: str) -> Tokenizer:
    from trainer.data.tokenizer import load_tokenizer as load_sp
    folder = resolve_path(data_path)
    name = "tokenizer.model" if os.path.exists(os.path.join(folder, "tokenizer.model")) or \
        not os.path.exists(os.path.join(folder, "tokenizer.json")) else "tokenizer.json"   # HF: tokenizers
    sp, info = load_sp(os.path.join(folder, name))
    return Tokenizer(sp, info.pad_id, info.eod_id, info.mask_id, info.vocab_size)


def full_model_state(path: str) -> dict:
    """The whole model's state dict from a checkpoint directory, experts re-assembled."""
    if _is_safetensors_checkpoint(path):   # written by `python -m evaluation.hf import`
        from .hf.safetensors_io import read_safetensors_dir
        return read_safetensors_dir(path)
    return dict(FragmentReader(path).iter_full(WEIGHTS))   # any layout; safetensors and JSON only


def _is_safetensors_checkpoint(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json"))


def iter_model_state(path: str):
    """(name, tensor) pairs of the whole model's state, experts re-assembled, one at a time, for
    exporters that write as they read: peak memory is one tensor (read from memory-mapped
    safetensors), whatever layout wrote the checkpoint."""
    if _is_safetensors_checkpoint(path):
        from .hf.safetensors_io import iter_safetensors_dir
        yield from iter_safetensors_dir(path)
        return
    yield from FragmentReader(path).iter_full(WEIGHTS)


def checkpoint_and_config(run_or_ckpt: str):
    """(checkpoint directory, RunConfig with moe.ep_size=1) of a run directory (its newest usable
    checkpoint), its checkpoints/ folder or one checkpoint directory, without loading any weights.
    Whatever the path, the checkpoint is verified (manifest, checksums, structure) first:
    CheckpointError (a FileNotFoundError) names what is wrong."""
    ckpt = resolve_checkpoint(run_or_ckpt)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    return ckpt, load_config(os.path.join(run_dir, "config.yaml"), ("moe.ep_size=1",))



def load_model_for_inference(run_or_ckpt: str, device="cpu"):
    """(model, RunConfig) from a run directory (its newest checkpoint) or a checkpoint directory,
    on one process with all experts local."""
    ckpt, cfg = checkpoint_and_config(run_or_ckpt)
    model = DiffusionTransformer(cfg.model_config)
    model.load_state_dict(full_model_state(ckpt))
    return model.to(device).eval(), cfg


def load_run(run_or_ckpt: str, device: str = "cpu", tokenizer_dir: Optional[str] = None):
    """(model in eval mode, RunConfig, Tokenizer) from a run directory or a checkpoint directory.

    The tokenizer is `<data.path>/tokenizer.model` of the run's config unless `tokenizer_dir`
    names another prepared data directory. Its special ids must match the model's.
    """
    model, cfg = load_model_for_inference(run_or_ckpt, device)
    tok = load_tokenizer(tokenizer_dir or cfg.data.path)
    m = cfg.model
    if (tok.mask_id, tok.pad_id) != (m.mask_id, m.pad_id) or tok.vocab_size > m.vocab_size:
        raise ValueError(f"tokenizer (mask {tok.mask_id}, pad {tok.pad_id}, vocab {tok.vocab_size}) does not "
                         f"match the model (model.mask_id={m.mask_id}, model.pad_id={m.pad_id}, "
                         f"model.vocab_size={m.vocab_size})")
    return model, cfg, tok
