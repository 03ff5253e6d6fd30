"""Reading a Hugging Face directory (LLaDA-MoE's format, an ecdlm export, or an autoregressive
MoE of model_type qwen3_moe or olmoe: ar_moe.py) into ecdlm.

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

from . import ar_moe, ecdlm_format, llada_moe
from .llada_moe import FormatError
from rundir.safetensors_io import iter_safetensors_dir, shard_files

from .tokenizer import mask_id_from_dir, token_id_in_dir


def read_config_json(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    with open(file) as f:
        return json.load(f)


def load_hf_dir(path: str, mask_id: Optional[int] = None, mask_token: str = llada_moe.MASK_TOKEN,
                add_mask_token: bool = False, pad_id: Optional[int] = None,
                fallback_mask_id: Optional[int] = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, state dict) of a Hugging Face directory, ready for DiffusionTransformer.

    `path`: config.json plus safetensors (one file, or shards with model.safetensors.index.json),
    in LLaDA-MoE's format (model_type llada / LLaDAMoEModelLM) or ecdlm's own export format.
    `mask_id`: the mask token id; LLaDA-MoE's config.json has none, so by default it is the id of
    `mask_token` in the directory's tokenizer (tokenizer.json / tokenizer_config.json /
    added_tokens.json). Tensors come back as fp32 (ecdlm's master weights), ep_size 1.
    Raises FormatError naming every field or tensor ecdlm cannot represent.
    qwen3_moe / olmoe: `add_mask_token` grows the vocabulary by the mask's row; `pad_id` defaults to
    pad_token_id, else eos_token_id; `fallback_mask_id` (init.from: the configured model.mask_id)
    is the mask when neither `mask_id` nor the tokenizer names one.
    """
    hf = read_config_json(path)
    if ar_moe.is_ar_moe(hf):   # qwen3_moe, olmoe: autoregressive MoE models (ar_moe.py)
        return _load_ar_moe(path, hf, mask_id, mask_token, add_mask_token, pad_id, fallback_mask_id)
    if add_mask_token or pad_id is not None:
        raise FormatError(f"{path}: --add-mask-token and --pad-id are for autoregressive models "
                          f"(model_type {', '.join(ar_moe.MODEL_TYPES)}), not model_type={hf.get('model_type')!r}")
    if hf.get("model_type") == ecdlm_format.MODEL_TYPE:
        cfg = ecdlm_format.model_config_from_ecdlm(hf)
        if mask_id is not None and mask_id != cfg.model.mask_id:
            raise FormatError(f"mask_id={mask_id} differs from the export's model.mask_id={cfg.model.mask_id}")
        return cfg, {name: t.float() for name, t in iter_safetensors_dir(path)}
    if not llada_moe.is_llada_moe(hf):
        raise FormatError(f"{path}/config.json: model_type={hf.get('model_type')!r} is none of 'ecdlm', "
                          f"LLaDA-MoE's 'llada' (architectures {llada_moe.ARCHITECTURE}), "
                          f"{', '.join(map(repr, ar_moe.MODEL_TYPES))}")
    if mask_id is None:
        mask_id = mask_id_from_dir(path, mask_token)
    cfg = llada_moe.model_config_from_llada(hf, mask_id)
    files = _open_shards(path)
    state = llada_moe.ecdlm_state_from_llada(cfg, lambda name: files[name].get_tensor(name), set(files),
                                             tied=bool(hf.get("tie_word_embeddings", False)))
    return cfg, state


def _open_shards(path: str) -> dict:
    """{tensor name: open safetensors handle holding it}."""
    files = {}
    for f in shard_files(path):
        h = safe_open(os.path.join(path, f), framework="pt")
        files.update({name: h for name in h.keys()})
    return files


def _load_ar_moe(path: str, hf: dict, mask_id: Optional[int], mask_token: str, add_mask_token: bool,
                 pad_id: Optional[int], fallback_mask_id: Optional[int]) -> tuple[ModelConfig, dict]:
    """An autoregressive MoE as a causal ecdlm model. The mask: `mask_id` (a spare or existing
    row), else a new row (`add_mask_token`), else `mask_token` if the tokenizer has it."""
    if add_mask_token and mask_id is not None:
        raise FormatError("give either --mask-id (an existing row) or --add-mask-token (a new row), not both")
    if add_mask_token:
        mask_id = hf.get("vocab_size")
    elif mask_id is None:
        mask_id = token_id_in_dir(path, mask_token)
        mask_id = fallback_mask_id if mask_id is None else mask_id
        if mask_id is None:
            raise FormatError(f"{path}: an autoregressive model has no mask token ({mask_token!r} is not in its "
                              "tokenizer): name a spare or existing row with --mask-id ID (Qwen3's embedding "
                              "has spare rows beyond its tokenizer), or add a row with --add-mask-token")
    cfg = ar_moe.model_config_from_ar(hf, mask_id, pad_id, add_mask_token)
    files = _open_shards(path)
    state = ar_moe.ecdlm_state_from_ar(cfg, lambda name: files[name].get_tensor(name), set(files),
                                       tied=bool(hf.get("tie_word_embeddings", False)),
                                       add_mask_token=add_mask_token)
    return cfg, state
