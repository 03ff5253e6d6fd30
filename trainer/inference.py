"""What every inference tool shares: loading a run (model, config, tokenizer) and the rule that
turns a partly masked sequence into the mask ratio r the expert-choice capacity schedule needs.

    model, cfg, tok = load_run("runs/tiny")          # newest complete checkpoint, eval mode
    ids = tok.encode("def f(x):")                    # no special tokens added
    r_B = mask_ratio(x_BL, valid_BL, mask_id)     # masked / non-pad, per sequence, as in pretraining

Legend: B batch, L length.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mask_ratio(x_BL: torch.Tensor, valid_BL: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Fraction of the non-pad positions that are currently masked, prompt included.

    This is r as pretraining sees it (no prompt there: every non-pad position can be masked), so an
    expert-choice model gets the capacity it learned for a sequence with that much of it hidden.
    A prompted sequence with one masked token has r = 1/L, not 1. A row of pads gets r = 0.
    """
    masked = ((x_BL == mask_id) & valid_BL).sum(1).to(torch.float32)
    return masked / valid_BL.sum(1).clamp_min(1).to(torch.float32)


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
    sp, info = load_sp(os.path.join(resolve_path(data_path), "tokenizer.model"))
    return Tokenizer(sp, info.pad_id, info.eod_id, info.mask_id, info.vocab_size)


def load_run(run_or_ckpt: str, device: str = "cpu", tokenizer_dir: Optional[str] = None):
    """(model in eval mode, RunConfig, Tokenizer) from a run directory or a checkpoint directory.

    The tokenizer is `<data.path>/tokenizer.model` of the run's config unless `tokenizer_dir`
    names another prepared data directory. Its special ids must match the model's.
    """
    from trainer.checkpoint import load_model_for_inference
    model, cfg = load_model_for_inference(run_or_ckpt, device)
    tok = load_tokenizer(tokenizer_dir or cfg.data.path)
    m = cfg.model
    if (tok.mask_id, tok.pad_id) != (m.mask_id, m.pad_id) or tok.vocab_size > m.vocab_size:
        raise ValueError(f"tokenizer (mask {tok.mask_id}, pad {tok.pad_id}, vocab {tok.vocab_size}) does not "
                         f"match the model (model.mask_id={m.mask_id}, model.pad_id={m.pad_id}, "
                         f"model.vocab_size={m.vocab_size})")
    return model, cfg, tok


def expert_parallel(model) -> bool:
    """True when the model's experts are split over ranks: every forward is then a collective
    whose all-to-all sizes the ranks agree on from shapes, so all ranks must run forwards of the
    same shape (see model/moe/dispatch.py)."""
    from model.moe.dispatch import AllToAllDispatcher
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    return any(isinstance(layer.dispatcher, AllToAllDispatcher) for layer in layers)


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:   # a parameter-free stand-in model (tests)
        return torch.device("cpu")
