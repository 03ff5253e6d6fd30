"""Autoregressive MoE checkpoints in Hugging Face's format, `model_type` qwen3_moe (Qwen3-30B-A3B,
Qwen3-235B-A22B, ...) and olmoe (OLMoE-1B-7B): their config.json fields and weights read into ecdlm,
as a causal model that reproduces its source (`model.attention=causal`), ready for conversion to an
expert-choice diffusion LM (`init.from=RUN model.attention=bidirectional moe.router=expert_choice`).

Semantics, checked against the installed transformers' modeling_qwen3_moe.py / modeling_olmoe.py:
  - router: logits = x W_r^T, fp32 softmax over all experts, top-k of the probabilities, renormalized
    to sum 1 when `norm_topk_prob` (ecdlm: token_choice, score_fn softmax, renormalize); no shared
    expert, no expert bias;
  - Qwen3: RMSNorm over head_dim on each q and k head (model.qk_norm=head); head_dim may differ from
    hidden_size / num_attention_heads (model.head_dim); layer i is sparse when i is not in
    `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0, else a dense SwiGLU of width
    `intermediate_size`; experts have width `moe_intermediate_size`;
  - OLMoE: RMSNorm over the whole q projection (hidden_size) and the whole k projection
    (num_key_value_heads * head_dim) before the heads are split (model.qk_norm=full); every layer
    sparse; experts have width `intermediate_size`; `clip_qkv` must be null;
  - both: rotate-half RoPE over the whole head with theta `rope_parameters.rope_theta` (transformers
    5) or `rope_theta` (older config.json files); causal attention; optional tied embeddings.
Whatever ecdlm cannot represent is refused by field name before anything is written.

Weights: Hugging Face's per-expert layout (`mlp.experts.{j}.{gate,up,down}_proj.weight`, as the
released checkpoints and transformers' save_pretrained write it) or the fused in-memory layout
(`mlp.experts.gate_up_proj` [E, 2I, D], `mlp.experts.down_proj` [E, D, I]); the other names are
LLaDA-MoE's (llada_moe.py maps them). AR vocabularies have no mask token: name a spare or existing
id (`mask_id`), or add one (`add_mask_token`): embedding and head grow by one row, initialized to
the mean of the existing rows (so the new token starts at the centre of the embedding cloud).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch

from model.config import ModelConfig, from_dict

from .llada_moe import FormatError, ecdlm_state_from_llada

MODEL_TYPES = ("qwen3_moe", "olmoe")


def is_ar_moe(hf: dict) -> bool:
    return hf.get("model_type") in MODEL_TYPES


def _positive_int(hf: dict, key: str, p: list) -> Optional[int]:
    v = hf.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        p.append(f"{key}={v!r} must be a positive integer")
        return None
    return v


def rope_theta(hf: dict, p: list) -> Optional[float]:
    """theta of plain RoPE; any scaling or partial rotation is refused by its field name."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        p.append(f"rope_parameters={params!r} must be a mapping")
        params = None
    for field, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        if isinstance(spec, dict):
            kind = spec.get("rope_type", spec.get("type", "default"))
            if kind != "default":
                p.append(f"{field}.rope_type={kind!r} must be 'default': ecdlm has plain RoPE (no scaling)")
            if spec.get("partial_rotary_factor", 1.0) != 1.0:
                p.append(f"{field}.partial_rotary_factor={spec['partial_rotary_factor']} must be 1.0")
        elif spec is not None:
            p.append(f"{field}={spec!r} must be null or a mapping")
    if hf.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        p.append(f"partial_rotary_factor={hf['partial_rotary_factor']} must be 1.0 (ecdlm rotates the whole head)")
    theta = (params or {}).get("rope_theta", hf.get("rope_theta"))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        p.append(f"rope_parameters.rope_theta (or rope_theta)={theta!r} must be a positive number")
        return None
    return float(theta)


def moe_layers_every(hf: dict, n_layers: int, p: list) -> Optional[int]:
    """ecdlm's moe_every n (MoE where (i + 1) % n == 0), or 0 when every layer is dense."""
    if hf["model_type"] == "olmoe":
        return 1
    step = hf.get("decoder_sparse_step", 1)
    only = hf.get("mlp_only_layers") or []
    if not isinstance(step, int) or step < 1:
        p.append(f"decoder_sparse_step={step!r} must be a positive integer")
        return None
    if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
        p.append(f"mlp_only_layers={only!r} must be a list of layer indices")
        return None
    sparse = [i not in only and (hf.get("num_experts") or 0) > 0 and (i + 1) % step == 0 for i in range(n_layers)]
    if not any(sparse):
        return 0
    if sparse != [(i + 1) % step == 0 for i in range(n_layers)]:
        p.append(f"mlp_only_layers={only} is not representable: ecdlm puts MoE in every n-th layer "
                 f"(layer i is MoE when (i + 1) % n == 0, n = decoder_sparse_step={step}) and nowhere else")
    return step


def default_pad_id(hf: dict) -> Optional[int]:
    """pad_token_id, else the (first) eos_token_id: an AR model never trained on pads."""
    for key in ("pad_token_id", "eos_token_id"):
        v = hf.get(key)
        v = v[0] if isinstance(v, list) and v else v
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
    return None


def model_config_from_ar(hf: dict, mask_id: int, pad_id: Optional[int] = None,
                         add_mask_token: bool = False) -> ModelConfig:
    """The causal, token-choice ecdlm ModelConfig of a qwen3_moe or olmoe config.json; raises
    FormatError naming every field ecdlm cannot represent. With `add_mask_token` the vocabulary is
    one row larger (the mask's); `mask_id` is then that row."""
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise FormatError(f"model_type={kind!r} must be one of {', '.join(MODEL_TYPES)}")
    p: list = []
    # one field, two spellings: transformers 5 writes Qwen3's num_experts as num_local_experts
    # (its attribute_map); the released config.json files say num_experts
    if "num_experts" not in hf and "num_local_experts" in hf:
        hf = {**hf, "num_experts": hf["num_local_experts"]}
    get = hf.get
    ints = {k: _positive_int(hf, k, p) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_experts", "num_experts_per_tok",
                                                  "max_position_embeddings")}
    expert_key = "moe_intermediate_size" if kind == "qwen3_moe" else "intermediate_size"
    ints[expert_key] = _positive_int(hf, expert_key, p)
    theta = rope_theta(hf, p)
    if get("hidden_act", "silu") != "silu":
        p.append(f"hidden_act={get('hidden_act')!r} must be 'silu' (ecdlm's experts are SwiGLU)")
    if get("attention_bias", False):
        p.append("attention_bias=true must be false (ecdlm's projections have no bias)")
    if get("use_sliding_window") or (get("sliding_window") is not None and kind != "qwen3_moe"):
        p.append(f"use_sliding_window={get('use_sliding_window')!r} / sliding_window={get('sliding_window')!r}: "
                 "ecdlm attends over the whole sequence (set use_sliding_window false)")
    if any(t != "full_attention" for t in (get("layer_types") or [])):
        p.append(f"layer_types={get('layer_types')} must all be 'full_attention' (ecdlm has no sliding window)")
    if get("clip_qkv") is not None:
        p.append(f"clip_qkv={get('clip_qkv')!r} must be null (ecdlm does not clip q, k, v)")
    for key in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
        if get(key):
            p.append(f"{key}={get(key)!r}: {kind}'s modeling code has no shared expert")
    if get("routed_scaling_factor", 1.0) not in (None, 1, 1.0):
        p.append(f"routed_scaling_factor={get('routed_scaling_factor')} must be 1 ({kind} never scales)")
    if get("num_local_experts") not in (None, get("num_experts")):
        p.append(f"num_local_experts={get('num_local_experts')} must equal num_experts={get('num_experts')}")
    if p:
        raise FormatError(f"cannot import this {kind} config: " + "; ".join(p))
    H, heads, layers = ints["hidden_size"], ints["num_attention_heads"], ints["num_hidden_layers"]
    kv = get("num_key_value_heads") or heads
    hd = get("head_dim") or H // heads
    if kind == "olmoe" and hd != H // heads:
        p.append(f"head_dim={hd} must be hidden_size/num_attention_heads={H // heads} (OLMoE's q norm is "
                 "hidden_size wide)")
    if not isinstance(kv, int) or heads % kv:
        p.append(f"num_key_value_heads={kv!r} must divide num_attention_heads={heads}")
    if get("num_experts_per_tok") > get("num_experts"):
        p.append(f"num_experts_per_tok={get('num_experts_per_tok')} exceeds num_experts={get('num_experts')}")
    every = moe_layers_every(hf, layers, p)
    vocab = ints["vocab_size"] + (1 if add_mask_token else 0)
    pad = default_pad_id(hf) if pad_id is None else pad_id
    if pad is None:
        p.append("pad_token_id and eos_token_id are null: name the pad id with --pad-id ID")
    if p:
        raise FormatError(f"cannot import this {kind} config: " + "; ".join(p))
    moe = {"router": "token_choice" if every else "dense", "num_experts": get("num_experts"),
           "expert_hidden": ints[expert_key], "k": get("num_experts_per_tok"), "num_shared_experts": 0,
           "moe_every": every or 1, "score_fn": "softmax", "renormalize": bool(get("norm_topk_prob", False)),
           "capacity_factor": None, "z_loss_coef": 0.0,
           "aux_loss_coef": float(get("router_aux_loss_coef", 0.0) or 0.0), "capacity": {"schedule": "static"}}
    if kind == "qwen3_moe":
        moe["dense_hidden"] = get("intermediate_size")
    model = {"vocab_size": vocab, "pad_id": pad, "mask_id": mask_id, "d_model": H, "n_layers": layers,
             "n_heads": heads, "n_kv_heads": kv, "head_dim": hd if hd != H // heads or H % heads else None,
             "max_seq_len": ints["max_position_embeddings"], "rope_theta": theta,
             "qk_norm": "head" if kind == "qwen3_moe" else "full", "attention": "causal",
             "norm_eps": float(get("rms_norm_eps", 1e-6)), "init_std": float(get("initializer_range", 0.02))}
    return from_dict(ModelConfig, {"model": model, "moe": moe})


def _unfused(take: Callable, names: set, n_experts: int) -> tuple[Callable, set]:
    """Present a fused expert layout under the per-expert names llada_moe.py reads."""
    fused = {n for n in names if n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))}
    if not fused:
        return take, names
    split = {}
    for n in fused:
        pre = n.rsplit("experts.", 1)[0] + "experts."
        for j in range(n_experts):
            if n.endswith("gate_up_proj"):
                split[f"{pre}{j}.gate_proj.weight"] = (n, j, 0)
                split[f"{pre}{j}.up_proj.weight"] = (n, j, 1)
            else:
                split[f"{pre}{j}.down_proj.weight"] = (n, j, None)
    cache: dict = {}

    def get(name):
        if name not in split:
            return take(name)
        src, j, half = split[name]
        if src not in cache:
            cache[src] = take(src)
        w = cache[src][j]                           # gate_up [2I, D] rows [gate; up]; down [D, I]
        return w if half is None else w.chunk(2, dim=0)[half]
    return get, (names - fused) | set(split)


def ecdlm_state_from_ar(mc: ModelConfig, take: Callable[[str], torch.Tensor], names: set, tied: bool,
                        add_mask_token: bool) -> dict:
    """ecdlm's state dict (fp32) from the checkpoint's tensors; the mask's row appended when added."""
    take, names = _unfused(take, names, mc.moe.num_experts)
    try:   # the names are LLaDA-MoE's (both follow Llama's); no expert bias, no shared expert here
        state = ecdlm_state_from_llada(mc, take, names, tied)
    except FormatError as err:
        raise FormatError(str(err).replace("LLaDA-MoE weights", "the weights")) from None
    if add_mask_token:
        for key in ("embed.weight", "head.weight"):
            w = state[key]
            state[key] = torch.cat([w, w.mean(0, keepdim=True)])   # the mask's row: the mean row
    return state


# ---- the tokenizer written into the run knows the mask -------------------------------------------
def add_mask_to_tokenizer(tok_dir: str, mask_id: int, mask_token: str) -> Optional[str]:
    """Make the run's tokenizer files name `mask_id` as the mask: a token already at that id keeps
    its text, else `mask_token` is added there as a special token. Returns the mask's text, None
    when the directory has no tokenizer.json."""
    tj = os.path.join(tok_dir, "tokenizer.json")
    if not os.path.exists(tj):
        return None
    with open(tj) as f:
        data = json.load(f)
    added = data.setdefault("added_tokens", [])
    vocab = (data.get("model") or {}).get("vocab")
    text = next((a["content"] for a in added if a.get("id") == mask_id), None)
    if text is None and isinstance(vocab, dict):
        text = next((t for t, i in vocab.items() if i == mask_id), None)
    if text is None:
        if any(a.get("content") == mask_token for a in added) or (isinstance(vocab, dict) and mask_token in vocab):
            raise FormatError(f"{mask_token!r} is already a token with another id than the mask id {mask_id}: "
                              f"choose another --mask-token")
        text = mask_token
        added.append({"id": mask_id, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
        with open(tj, "w") as f:
            json.dump(data, f, ensure_ascii=False)
    tc = os.path.join(tok_dir, "tokenizer_config.json")
    config = {}
    if os.path.exists(tc):
        with open(tc) as f:
            config = json.load(f)
    config["mask_token"] = text
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict) and str(mask_id) not in decoder:
        decoder[str(mask_id)] = {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": True}
    with open(tc, "w") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return text
