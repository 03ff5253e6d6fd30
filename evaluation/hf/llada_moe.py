"""LLaDA-MoE's checkpoint format: its config.json fields and weight names, and how they map onto
ecdlm's model in both directions, with the checks that decide whether a model fits.

The semantics are those of LLaDA-MoE's released modeling code (`modeling_lladamoe.py`):
  - router: fp32 softmax over all experts; with `moe_router_enable_expert_bias` the `expert_bias`
    buffer is added to the probabilities, top-k is taken on the sum and the sums are the gates
    (ecdlm: `moe.expert_bias_in_gates`); no renormalization (the code fixes norm_topk_prob off);
  - QK-norm: RMSNorm over head_dim on q and k before RoPE; RoPE is rotate-half over the whole head;
  - `moe_layer_freq[i]` 0 marks a dense layer of width `dense_intermediate_size`;
  - a shared expert is built whenever `shared_expert_intermediate_size` is not None.
Fields its code reads but ecdlm cannot represent are refused by name; so are fields its code
ignores (score function, norm_topk_prob, routed_scaling_factor, router groups) when they claim
something other than what that code does, since the weights' behaviour would then be ambiguous.

Weight names (ecdlm fuses k|v, gate|up and stacks the experts; the mapping splits and joins them):
  model.embed_tokens.weight                      embed.weight
  model.layers.{i}.input_layernorm.weight        blocks.{i}.attn_norm.weight
  model.layers.{i}.self_attn.{q,o}_proj.weight   blocks.{i}.attn.{wq,wo}.weight
  model.layers.{i}.self_attn.{k,v}_proj.weight   blocks.{i}.attn.wkv.weight   rows [k; v]
  model.layers.{i}.self_attn.{q,k}_norm.weight   blocks.{i}.attn.{q,k}_norm.weight
  model.layers.{i}.post_attention_layernorm      blocks.{i}.ffn_norm.weight
  model.layers.{i}.mlp.gate.weight [E, H]        blocks.{i}.ffn.router.weight
  model.layers.{i}.mlp.expert_bias [E]           blocks.{i}.ffn.expert_bias
  model.layers.{i}.mlp.experts.{j}.*_proj        blocks.{i}.ffn.experts.w_in_EDF[j] = [gate^T | up^T],
                                                 w_out_EHD[j] = down^T
  model.layers.{i}.shared_expert.*_proj          blocks.{i}.ffn.shared.w_in = [gate; up], w_out = down
  model.layers.{i}.mlp.{gate,up,down}_proj       blocks.{i}.ffn.w_in = [gate; up], w_out = down (dense)
  model.norm.weight, lm_head.weight              norm.weight, head.weight
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from model.config import ModelConfig, dense_hidden, from_dict, is_moe_layer, shared_hidden

MODEL_TYPE = "llada"
ARCHITECTURE = "LLaDAMoEModelLM"
# the released remote code's files and classes: configuration_lladamoe.py defines LLaDAConfig
# (model_type "llada"), modeling_lladamoe.py LLaDAMoEModelLM. That code loads under transformers
# 4.x only, and ignores attention_mask (docs/operations-safety.md, "LLaDA-MoE exports").
AUTO_MAP = {"AutoConfig": "configuration_lladamoe.LLaDAConfig",
            "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
            "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"}
MASK_TOKEN = "<|mask|>"


class FormatError(ValueError):
    """A checkpoint or model that does not fit the format; the message names every field."""


def is_llada_moe(hf: dict) -> bool:
    return hf.get("model_type") in ("llada", "lladamoe") or ARCHITECTURE in (hf.get("architectures") or [])


# ---- LLaDA-MoE config.json -> ecdlm ModelConfig ------------------------------------------------
def _moe_every(freq, n_layers: int, problems: list) -> Optional[int]:
    """ecdlm's moe_every n from moe_layer_freq (MoE where (i + 1) % n == 0); 0 for all dense."""
    if not isinstance(freq, list) or len(freq) != n_layers or any(v not in (0, 1) for v in freq):
        problems.append(f"moe_layer_freq={freq!r} must be a list of {n_layers} zeros and ones")
        return None
    if not any(freq):
        return 0
    n = freq.index(1) + 1
    if freq != [int((i + 1) % n == 0) for i in range(n_layers)]:
        problems.append(f"moe_layer_freq={freq} is not representable: ecdlm puts MoE in every n-th "
                        f"layer (layer i is MoE when (i + 1) % n == 0)")
    return n


def model_config_from_llada(hf: dict, mask_id: int) -> ModelConfig:
    """The ecdlm ModelConfig of a LLaDA-MoE config.json; raises FormatError naming every field
    that ecdlm cannot represent."""
    p: list = []
    get = hf.get
    need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
            "num_experts_per_tok", "expert_intermediate_size", "rope_theta", "max_position_embeddings")
    missing = [k for k in need if not isinstance(get(k), (int, float)) or isinstance(get(k), bool) or get(k) <= 0]
    if missing:
        raise FormatError("config.json: " + "; ".join(f"{k}={get(k)!r} must be a positive number" for k in missing))
    H, heads, layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    if get("hidden_act", "silu") != "silu":
        p.append(f"hidden_act={get('hidden_act')!r} must be 'silu' (ecdlm's experts are SwiGLU)")
    if get("partial_rotary_factor") != 1.0:
        p.append(f"partial_rotary_factor={get('partial_rotary_factor')!r} must be 1.0 (ecdlm rotates the whole head)")
    if get("rope_scaling") not in (None, {}) and (get("rope_scaling") or {}).get("rope_type", "default") != "default":
        p.append(f"rope_scaling={get('rope_scaling')!r} must be null (ecdlm has plain RoPE)")
    if get("attention_bias", False):
        p.append("attention_bias=true must be false (ecdlm's projections have no bias)")
    if get("clip_qkv") is not None:
        p.append(f"clip_qkv={get('clip_qkv')!r} must be null (ecdlm does not clip q, k, v)")
    if get("head_dim") not in (None, H // heads):
        p.append(f"head_dim={get('head_dim')} must be hidden_size/num_attention_heads={H // heads}")
    for key in ("router_num_group", "router_topk_group"):
        if get(key) is not None and get(key) > 1:
            p.append(f"{key}={get(key)} must be null or 1: ecdlm has no grouped routing")
    if get("routed_scaling_factor", 1) not in (None, 1, 1.0):
        p.append(f"routed_scaling_factor={get('routed_scaling_factor')} must be 1 (the released code never scales)")
    if get("moe_router_score_function") not in (None, "softmax"):
        p.append(f"moe_router_score_function={get('moe_router_score_function')!r} must be 'softmax': the released "
                 "modeling code always routes by softmax")
    if get("norm_topk_prob"):
        p.append("norm_topk_prob=true must be false: the released modeling code never renormalizes the top-k")
    shared = get("shared_expert_intermediate_size")
    if shared is not None and (not isinstance(shared, int) or shared <= 0):
        p.append(f"shared_expert_intermediate_size={shared!r} must be null (no shared expert) or a positive width")
    every = _moe_every(get("moe_layer_freq"), layers, p)
    pad = get("pad_token_id")
    if not isinstance(pad, int):
        p.append(f"pad_token_id={pad!r} must be a token id")
    if p:
        raise FormatError("cannot import this LLaDA-MoE config: " + "; ".join(p))
    moe = {"router": "token_choice" if every else "dense", "num_experts": hf["num_experts"],
           "expert_hidden": hf["expert_intermediate_size"], "k": hf["num_experts_per_tok"],
           "num_shared_experts": 1 if shared else 0, "shared_expert_hidden": shared or None,
           "moe_every": every or 1, "dense_hidden": get("dense_intermediate_size") if (get("dense_intermediate_size") or 0) > 0 else None,
           "score_fn": "softmax", "renormalize": False, "capacity_factor": None,
           "aux_loss_coef": float(get("router_aux_loss_coef", 0.0) or 0.0),
           "expert_bias_in_gates": bool(get("moe_router_enable_expert_bias")) and bool(every),
           "capacity": {"schedule": "static"}}
    model = {"vocab_size": hf["vocab_size"], "pad_id": pad, "mask_id": mask_id, "d_model": H,
             "n_layers": layers, "n_heads": heads, "n_kv_heads": get("num_key_value_heads") or heads,
             "max_seq_len": hf["max_position_embeddings"], "rope_theta": float(hf["rope_theta"]),
             "qk_norm": bool(get("qk_layernorm")), "norm_eps": float(get("rms_norm_eps", 1e-5)),
             "init_std": float(get("initializer_range", 0.02))}
    return from_dict(ModelConfig, {"model": model, "moe": moe})


# ---- ecdlm ModelConfig -> LLaDA-MoE config.json ------------------------------------------------
def fit_problems(mc: ModelConfig) -> list:
    """Every reason the model cannot be written as LLaDA-MoE (empty when it fits)."""
    m, e, p = mc.model, mc.moe, []
    if e.router == "expert_choice":
        p.append("moe.router=expert_choice: LLaDA-MoE routes by token choice (export --format ecdlm instead)")
    if e.router == "token_choice":
        if e.score_fn != "softmax":
            p.append(f"moe.score_fn={e.score_fn!r} must be softmax")
        if e.renormalize:
            p.append("moe.renormalize=true must be false (LLaDA-MoE never renormalizes the top-k)")
        if e.capacity_factor is not None:
            p.append(f"moe.capacity_factor={e.capacity_factor} must be null (LLaDA-MoE is dropless)")
        if e.bias_update_rate > 0 and not e.expert_bias_in_gates:
            p.append("moe.bias_update_rate>0 with moe.expert_bias_in_gates=false: ecdlm's bias only selects, "
                     "LLaDA-MoE's bias is also in the gates")
    if m.logit_softcap is not None:
        p.append(f"model.logit_softcap={m.logit_softcap} must be null")
    if m.qk_norm == "full":
        p.append("model.qk_norm=full must be head or false (LLaDA-MoE normalizes q and k per head)")
    if m.head_dim not in (None, m.d_model // m.n_heads):
        p.append(f"model.head_dim={m.head_dim} must be null (LLaDA-MoE's head dim is d_model/n_heads)")
    if m.attention != "bidirectional":
        p.append(f"model.attention={m.attention} must be bidirectional (LLaDA-MoE is a diffusion LM)")
    return p


def llada_config(mc: ModelConfig, eos_id: Optional[int] = None) -> dict:
    """LLaDA-MoE's config.json for `mc`; raises FormatError naming every mismatch."""
    problems = fit_problems(mc)
    if problems:
        raise FormatError("this run does not fit LLaDA-MoE: " + "; ".join(problems))
    m, e = mc.model, mc.moe
    moe = e.router != "dense"
    return {
        "architectures": [ARCHITECTURE], "auto_map": AUTO_MAP, "model_type": MODEL_TYPE,
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads or m.n_heads,
        "max_position_embeddings": m.max_seq_len, "rope_theta": m.rope_theta, "partial_rotary_factor": 1.0,
        "rope_scaling": None, "rms_norm_eps": m.norm_eps, "qk_layernorm": bool(m.qk_norm),
        "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None, "hidden_act": "silu",
        "initializer_range": m.init_std, "tie_word_embeddings": False, "use_cache": False,
        "pad_token_id": m.pad_id, "eos_token_id": eos_id, "bos_token_id": None,
        "num_experts": e.num_experts, "num_experts_per_tok": e.k,
        "expert_intermediate_size": e.expert_hidden, "dense_intermediate_size": dense_hidden(e),
        # explicitly null: the class default is -1, and its code builds a shared expert unless None
        "shared_expert_intermediate_size": (e.num_shared_experts * shared_hidden(e)
                                            if moe and e.num_shared_experts else None),
        "moe_layer_freq": [int(is_moe_layer(i, e)) for i in range(m.n_layers)],
        "moe_router_score_function": "softmax", "moe_router_enable_expert_bias": bool(e.expert_bias_in_gates),
        "norm_topk_prob": False, "routed_scaling_factor": 1, "router_num_group": None,
        "router_topk_group": None, "router_aux_loss_coef": e.aux_loss_coef, "output_router_logits": False,
        "torch_dtype": "float32",
    }


# ---- tensors --------------------------------------------------------------------------------
def _split(w: torch.Tensor, n: int) -> tuple:
    return w[:n], w[n:]


def llada_tensors(mc: ModelConfig, name: str, t: torch.Tensor) -> Iterator[tuple]:
    """The LLaDA-MoE (name, tensor) pairs that one ecdlm state entry becomes (streaming export)."""
    m, e = mc.model, mc.moe
    if name == "embed.weight":
        yield "model.embed_tokens.weight", t
        return
    if name == "norm.weight":
        yield "model.norm.weight", t
        return
    if name == "head.weight":
        yield "lm_head.weight", t
        return
    _, i, rest = name.split(".", 2)
    pre = f"model.layers.{i}."
    kv = (m.n_kv_heads or m.n_heads) * (m.d_model // m.n_heads)
    simple = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
              "attn.wq.weight": "self_attn.q_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
              "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight",
              "ffn.router.weight": "mlp.gate.weight"}
    if rest in simple:
        yield pre + simple[rest], t
    elif rest == "attn.wkv.weight":
        k, v = _split(t, kv)
        yield pre + "self_attn.k_proj.weight", k
        yield pre + "self_attn.v_proj.weight", v
    elif rest == "ffn.expert_bias":
        if e.expert_bias_in_gates:   # otherwise the format has no such buffer (and it is unused)
            yield pre + "mlp.expert_bias", t
    elif rest == "ffn.experts.w_in_EDF":
        h = e.expert_hidden
        for j in range(t.shape[0]):
            yield pre + f"mlp.experts.{j}.gate_proj.weight", t[j, :, :h].t()
            yield pre + f"mlp.experts.{j}.up_proj.weight", t[j, :, h:].t()
    elif rest == "ffn.experts.w_out_EHD":
        for j in range(t.shape[0]):
            yield pre + f"mlp.experts.{j}.down_proj.weight", t[j].t()
    elif rest in ("ffn.w_in.weight", "ffn.shared.w_in.weight"):
        mod = "mlp" if rest == "ffn.w_in.weight" else "shared_expert"
        gate, up = _split(t, t.shape[0] // 2)
        yield pre + f"{mod}.gate_proj.weight", gate
        yield pre + f"{mod}.up_proj.weight", up
    elif rest in ("ffn.w_out.weight", "ffn.shared.w_out.weight"):
        yield pre + ("mlp" if rest == "ffn.w_out.weight" else "shared_expert") + ".down_proj.weight", t
    else:
        raise FormatError(f"no LLaDA-MoE name for ecdlm tensor {name!r}")


def ecdlm_state_from_llada(mc: ModelConfig, take: Callable[[str], torch.Tensor], names: set,
                           tied: bool) -> dict:
    """ecdlm's state dict from LLaDA-MoE tensors. `take(name)` returns (and may release) one
    tensor; `names` is every tensor name present, so missing and unexpected ones are reported."""
    m, e = mc.model, mc.moe
    used: set = set()
    problems: list = []

    def get(name):
        if name not in names:
            problems.append(f"missing tensor {name}")
            return None
        used.add(name)
        return take(name).to(torch.float32)

    def cat(*ts, dim=0):
        return None if any(t is None for t in ts) else torch.cat(ts, dim)

    state = {"embed.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    for i in range(m.n_layers):
        pre, out = f"model.layers.{i}.", f"blocks.{i}."
        state[out + "attn_norm.weight"] = get(pre + "input_layernorm.weight")
        state[out + "ffn_norm.weight"] = get(pre + "post_attention_layernorm.weight")
        state[out + "attn.wq.weight"] = get(pre + "self_attn.q_proj.weight")
        state[out + "attn.wkv.weight"] = cat(get(pre + "self_attn.k_proj.weight"), get(pre + "self_attn.v_proj.weight"))
        state[out + "attn.wo.weight"] = get(pre + "self_attn.o_proj.weight")
        if m.qk_norm:
            state[out + "attn.q_norm.weight"] = get(pre + "self_attn.q_norm.weight")
            state[out + "attn.k_norm.weight"] = get(pre + "self_attn.k_norm.weight")
        if not is_moe_layer(i, e):
            state[out + "ffn.w_in.weight"] = cat(get(pre + "mlp.gate_proj.weight"), get(pre + "mlp.up_proj.weight"))
            state[out + "ffn.w_out.weight"] = get(pre + "mlp.down_proj.weight")
            continue
        state[out + "ffn.router.weight"] = get(pre + "mlp.gate.weight")
        state[out + "ffn.expert_bias"] = (get(pre + "mlp.expert_bias") if e.expert_bias_in_gates
                                          else torch.zeros(e.num_experts))
        w_in, w_out = [], []
        for j in range(e.num_experts):
            x = f"{pre}mlp.experts.{j}."
            gate, up, down = get(x + "gate_proj.weight"), get(x + "up_proj.weight"), get(x + "down_proj.weight")
            w_in.append(None if gate is None or up is None else torch.cat([gate.t(), up.t()], 1))   # [D, 2H]
            w_out.append(None if down is None else down.t())                                       # [H, D]
        if all(w is not None for w in w_in + w_out):
            state[out + "ffn.experts.w_in_EDF"] = torch.stack(w_in)       # [E, D, 2H]
            state[out + "ffn.experts.w_out_EHD"] = torch.stack(w_out)     # [E, H, D]
        if e.num_shared_experts:
            state[out + "ffn.shared.w_in.weight"] = cat(get(pre + "shared_expert.gate_proj.weight"),
                                                        get(pre + "shared_expert.up_proj.weight"))
            state[out + "ffn.shared.w_out.weight"] = get(pre + "shared_expert.down_proj.weight")
    if tied:   # tie_word_embeddings: the head is the embedding (a stored lm_head is overwritten by it)
        used.add("lm_head.weight")
        state["head.weight"] = None if state["embed.weight"] is None else state["embed.weight"].clone()
    else:
        state["head.weight"] = get("lm_head.weight")
    # the released code registers the bias buffer only when enabled; a stray one is harmless
    unexpected = sorted(n for n in names - used if not n.endswith("mlp.expert_bias"))
    if unexpected:
        problems.append(f"unexpected tensors {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    if problems:
        raise FormatError("LLaDA-MoE weights do not match their config.json: " + "; ".join(problems[:8]))
    return state

