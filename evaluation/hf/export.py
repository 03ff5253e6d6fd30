"""Export a run (or one checkpoint) of any parallel layout to a Hugging Face directory.

    export("runs/tiny", "hf/tiny")                                   # ecdlm format, remote code
    export("runs/tc", "hf/tc-llada", fmt="llada-moe", dtype="bfloat16", max_shard_bytes=2 << 30)

Tensors stream from the checkpoint (evaluation.loading.iter_model_state) through the format's
name mapping into safetensors shards, so memory holds about one shard plus the tensor in hand.
Nothing is written before the format's fit check has passed, and nothing in OUT_DIR that an
earlier ecdlm export did not write is ever replaced or removed (export_record.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from model.config import ModelConfig

from . import ecdlm_format, export_record, llada_moe
from rundir.safetensors_io import INDEX, ShardedWriter
from .tokenizer import export_tokenizer

FORMATS = ("ecdlm", "llada-moe")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_BYTES = 5 * 10**9   # transformers' own default ("5GB")


@dataclass
class ExportResult:
    out_dir: str
    checkpoint: str
    files: list
    tensors: int
    bytes: int
    tokenizer: list


def model_config_of(cfg) -> ModelConfig:
    """The ModelConfig of a RunConfig (its model, moe and diffusion sections), one process."""
    return ModelConfig(model=cfg.model, moe=cfg.moe, diffusion=cfg.diffusion)


def export(run_or_ckpt: str, out_dir: str, fmt: str = "ecdlm", dtype: str = "float32",
           max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer_dir: Optional[str] = None) -> ExportResult:
    from rundir.state import checkpoint_and_config, iter_model_state
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r} must be one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    ckpt, run_cfg = checkpoint_and_config(run_or_ckpt)
    mc = model_config_of(run_cfg)
    tok_src = tokenizer_dir or run_cfg.data.path
    eos = _eos_id(tok_src)
    files, n, nbytes = write_hf_dir(mc, iter_model_state(ckpt), out_dir, fmt, dtype, max_shard_bytes, eos)
    tok_files = export_tokenizer(tok_src, out_dir, mc) if tok_src else []
    export_record.write_record(out_dir, files + tok_files)
    return ExportResult(out_dir, ckpt, files, n, nbytes, tok_files)


def write_hf_dir(mc: ModelConfig, state_items, out_dir: str, fmt: str = "ecdlm", dtype: str = "float32",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, eos_id: Optional[int] = None) -> tuple:
    """Write config.json, weights (from `state_items`, (name, tensor) pairs of ecdlm's state, taken
    one at a time) and, for the ecdlm format, the remote code. Returns (files, tensors, bytes)."""
    # the config first: a run that does not fit is refused before anything is written
    hf_cfg = (ecdlm_format.ecdlm_config(mc, eos_id, dtype) if fmt == "ecdlm" else
              dict(llada_moe.llada_config(mc, eos_id), torch_dtype=dtype))
    export_record.claim(out_dir)   # refuses files it did not write; removes an earlier export's shards
    target = DTYPES[dtype]
    n, writer = 0, ShardedWriter(out_dir, max_shard_bytes)
    for name, tensor in state_items:
        pairs = [(name, tensor)] if fmt == "ecdlm" else llada_moe.llada_tensors(mc, name, tensor)
        for out_name, t in pairs:
            # the expert bias stays fp32: top-k on probabilities + bias is sensitive to rounding
            keep = out_name.endswith("expert_bias") or not t.is_floating_point()
            writer.add(out_name, t if keep else t.to(target))
            n += 1
        del tensor, pairs
    files = writer.close()
    if os.path.exists(os.path.join(out_dir, INDEX)):
        files.append(INDEX)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    files.append("config.json")
    if fmt == "ecdlm":
        ecdlm_format.copy_code(out_dir)
        files.extend(ecdlm_format.CODE_FILES)
    export_record.write_record(out_dir, files)   # rewritten by export() with the tokenizer's files
    return files, n, writer.total_bytes


def _eos_id(tok_src: Optional[str]) -> Optional[int]:
    from rundir.tokenizer import data_tokenizer
    try:
        return data_tokenizer(tok_src).eod_id if tok_src else None
    except (OSError, ValueError):   # the run's tokenizer is not on this machine: no eos in config
        return None
