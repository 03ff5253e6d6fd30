"""Loading a finished run on one process for inference: its model (every expert local, from a
checkpoint of any parallel layout) and its tokenizer. What is read without building a model (the
checkpoint, config and tensors) is rundir/state.py's, shared with training's `init.from`.

    model, cfg, tok = load_run("runs/tiny")          # newest complete checkpoint, eval mode
    ids = tok.encode("def f(x):")                    # no special tokens added
"""
from __future__ import annotations

from typing import Optional

from model import DiffusionTransformer
from rundir.state import checkpoint_and_config, full_model_state
from rundir.tokenizer import data_tokenizer


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
    tok = data_tokenizer(tokenizer_dir or cfg.data.path)
    m = cfg.model
    if (tok.mask_id, tok.pad_id) != (m.mask_id, m.pad_id) or tok.vocab_size > m.vocab_size:
        raise ValueError(f"tokenizer (mask {tok.mask_id}, pad {tok.pad_id}, vocab {tok.vocab_size}) does not "
                         f"match the model (model.mask_id={m.mask_id}, model.pad_id={m.pad_id}, "
                         f"model.vocab_size={m.vocab_size})")
    return model, cfg, tok
