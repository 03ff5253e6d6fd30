"""`python -m evaluation.hf import HF_DIR OUT_RUN`: an imported model as an ecdlm run directory
that every evaluation tool loads like a trained run (`load_run`, the sampler, perplexity, ...).

    OUT_RUN/config.yaml                          model/moe/diffusion from the import; data.path = tokenizer/
    OUT_RUN/tokenizer/                           the directory's tokenizer JSON files
    OUT_RUN/checkpoints/step_00000000/           model.safetensors (sharded with an index when large), COMPLETE
    OUT_RUN/checkpoints/latest
"""
from __future__ import annotations

import os
from typing import Optional

import yaml

from rundir.checkpoints import file_digest, tag_for, write_latest, write_manifest
from rundir.config import load_config

from .ecdlm_format import sections
from .ar_moe import add_mask_to_tokenizer
from .importer import load_hf_dir
from rundir.safetensors_io import INDEX, ShardedWriter
from .tokenizer import copy_tokenizer_files


def import_to_run(hf_dir: str, out_run: str, mask_id: Optional[int] = None, mask_token: str = "<|mask|>",
                  max_shard_bytes: int = 5 * 10**9, add_mask_token: bool = False,
                  pad_id: Optional[int] = None) -> str:
    """Write the run; returns its checkpoint directory. OUT_RUN must not exist yet or be an empty
    directory: an import never writes into a training run (its config.yaml and `latest` would
    be replaced) or any other folder with files in it (FileExistsError, nothing written).
    add_mask_token, pad_id: see load_hf_dir."""
    out_run = os.path.abspath(out_run)
    refuse_non_empty(out_run)
    cfg, state = load_hf_dir(hf_dir, mask_id, mask_token, add_mask_token=add_mask_token, pad_id=pad_id)
    refuse_non_empty(out_run)   # loading takes a while: check again just before writing
    tok_dir = os.path.join(out_run, "tokenizer")
    os.makedirs(tok_dir)
    copy_tokenizer_files(hf_dir, tok_dir)
    if cfg.model.attention == "causal":   # an autoregressive import: its tokenizer learns the mask
        add_mask_to_tokenizer(tok_dir, cfg.model.mask_id, mask_token)
    # an autoregressive import is a starting point: a run trained from it (`--config OUT_RUN/config.yaml
    # init.from=OUT_RUN ...`) writes beside it, never into it (it would resume from the import)
    name = os.path.basename(out_run) + ("-converted" if cfg.model.attention == "causal" else "")
    run = {**sections(cfg),
           "train": {"run_name": name, "output_dir": os.path.join(os.path.dirname(out_run), name),
                     "seq_len": min(128, cfg.model.max_seq_len)},
           "data": {"path": tok_dir}}   # load_run reads the tokenizer here (none: tools that need one say so)
    with open(os.path.join(out_run, "config.yaml"), "w") as f:
        yaml.safe_dump(run, f, sort_keys=False)
    load_config(os.path.join(out_run, "config.yaml"))   # the trainer's own validation, before the weights
    root = os.path.join(out_run, "checkpoints")
    ckpt = os.path.join(root, tag_for(0))
    os.makedirs(ckpt, exist_ok=True)
    writer = ShardedWriter(ckpt, max_shard_bytes)
    for name in list(state):
        writer.add(name, state.pop(name))
    files = writer.close() + ([INDEX] if os.path.exists(os.path.join(ckpt, INDEX)) else [])
    # the trainer's COMPLETE manifest: the files with their sizes and checksums, written last
    write_manifest(ckpt, 0, {f: file_digest(os.path.join(ckpt, f)) for f in files}, healthy=True)
    write_latest(root, 0)
    return ckpt


def refuse_non_empty(out_run: str) -> None:
    if not os.path.lexists(out_run):
        return
    if not os.path.isdir(out_run) or os.path.islink(out_run):
        raise FileExistsError(f"{out_run} exists and is not a directory; import into a new run directory")
    if os.listdir(out_run):
        what = ("a training run (it has config.yaml or checkpoints/)"
                if {"config.yaml", "checkpoints"} & set(os.listdir(out_run)) else "not empty")
        raise FileExistsError(f"{out_run} is {what}; an import writes a new run: give a directory that does not "
                              f"exist yet (nothing was written)")
