"""Reading a Hugging Face directory (LLaDA-MoE's format or an ecdlm export) into ecdlm.

    from evaluation.hf.importer import load_hf_dir
    cfg, state = load_hf_dir("LLaDA-MoE-7B-A1B-Base")      # ModelConfig, full state dict (fp32)
    model = DiffusionTransformer(cfg); model.load_state_dict(state)

Only config.json, tokenizer JSON and safetensors are read: never a pickle.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from safetensors import safe_open

from model.config import ModelConfig

from . import ecdlm_format, llada_moe
from .llada_moe import FormatError
from rundir.safetensors_io import iter_safetensors_dir, shard_files
from .tokenizer import mask_id_from_dir


def read_config_json(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    with open(file) as f:
        return json.load(f)


def load_hf_dir(path: str, mask_id: Optional[int] = None, mask_token: str = llada_moe.MASK_TOKEN
                ) -> tuple[ModelConfig, dict]:
    """(ModelConfig, state dict) of a Hugging Face directory, ready for DiffusionTransformer.

    `path`: config.json plus safetensors (one file, or shards with model.safetensors.index.json),
    in LLaDA-MoE's format (model_type llada / LLaDAMoEModelLM) or ecdlm's own export format.
    `mask_id`: the mask token id; LLaDA-MoE's config.json has none, so by default it is the id of
    `mask_token` in the directory's tokenizer (tokenizer.json / tokenizer_config.json /
    added_tokens.json). Tensors come back as fp32 (ecdlm's master weights), ep_size 1.
    Raises FormatError naming every field or tensor ecdlm cannot represent.
    """
    hf = read_config_json(path)
    if hf.get("model_type") == ecdlm_format.MODEL_TYPE:
        cfg = ecdlm_format.model_config_from_ecdlm(hf)
        if mask_id is not None and mask_id != cfg.model.mask_id:
            raise FormatError(f"mask_id={mask_id} differs from the export's model.mask_id={cfg.model.mask_id}")
        return cfg, {name: t.float() for name, t in iter_safetensors_dir(path)}
    if not llada_moe.is_llada_moe(hf):
        raise FormatError(f"{path}/config.json: model_type={hf.get('model_type')!r} is neither 'ecdlm' nor "
                          f"LLaDA-MoE's 'llada' (architectures {llada_moe.ARCHITECTURE})")
    if mask_id is None:
        mask_id = mask_id_from_dir(path, mask_token)
    cfg = llada_moe.model_config_from_llada(hf, mask_id)
    files = {}
    handles = [safe_open(os.path.join(path, f), framework="pt") for f in shard_files(path)]
    for h in handles:
        files.update({name: h for name in h.keys()})
    state = llada_moe.ecdlm_state_from_llada(cfg, lambda name: files[name].get_tensor(name), set(files),
                                             tied=bool(hf.get("tie_word_embeddings", False)))
    return cfg, state
