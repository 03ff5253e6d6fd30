"""Hugging Face interop: LLaDA-MoE-format import against an independent reference forward, export
round trips, ecdlm-format exports loaded by `transformers` (remote code, no ecdlm on sys.path),
sharding, ep=2 against ep=1, and the LLaDA-MoE-7B preset's parameter counts."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model import DiffusionTransformer, from_dict
from model.config import ModelConfig
from tests.trainer.launch import ROOT
from rundir.config import load_config

from evaluation.hf.importer import load_hf_dir
from evaluation.hf.llada_moe import FormatError, llada_config, llada_tensors
from rundir.safetensors_io import read_safetensors_dir

MASK = 30


# ---- a small random LLaDA-MoE directory, written from the format's field and key names ----------
def llada_fields(**over) -> dict:
    cfg = {"model_type": "llada", "architectures": ["LLaDAMoEModelLM"], "vocab_size": 40, "hidden_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_experts": 8, "num_experts_per_tok": 2, "expert_intermediate_size": 12,
           "dense_intermediate_size": 24, "shared_expert_intermediate_size": None, "moe_layer_freq": [1, 1],
           "qk_layernorm": True, "moe_router_score_function": "softmax", "moe_router_enable_expert_bias": True,
           "norm_topk_prob": False, "partial_rotary_factor": 1.0, "rope_theta": 50000.0, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "max_position_embeddings": 64, "pad_token_id": 1, "eos_token_id": 2,
           "hidden_act": "silu", "attention_bias": False, "clip_qkv": None, "rope_scaling": None}
    cfg.update(over)
    return cfg


def random_llada_tensors(c: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    H, V, E, h = c["hidden_size"], c["vocab_size"], c["num_experts"], c["expert_intermediate_size"]
    hd = H // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd

    def w(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    t = {"model.embed_tokens.weight": w(V, H, scale=1.0), "model.norm.weight": 1 + w(H, scale=0.1),
         "lm_head.weight": w(V, H)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": 1 + w(H, scale=0.1), p + "post_attention_layernorm.weight": 1 + w(H, scale=0.1),
              p + "self_attn.q_proj.weight": w(H, H), p + "self_attn.k_proj.weight": w(kv, H),
              p + "self_attn.v_proj.weight": w(kv, H), p + "self_attn.o_proj.weight": w(H, H),
              p + "self_attn.q_norm.weight": 1 + w(hd, scale=0.1), p + "self_attn.k_norm.weight": 1 + w(hd, scale=0.1)}
        if c["moe_layer_freq"][i]:
            t[p + "mlp.gate.weight"] = w(E, H, scale=1.0)
            if c["moe_router_enable_expert_bias"]:
                t[p + "mlp.expert_bias"] = w(E, scale=0.05)
            for j in range(E):
                t |= {p + f"mlp.experts.{j}.gate_proj.weight": w(h, H), p + f"mlp.experts.{j}.up_proj.weight": w(h, H),
                      p + f"mlp.experts.{j}.down_proj.weight": w(H, h)}
        else:
            d = c["dense_intermediate_size"]
            t |= {p + "mlp.gate_proj.weight": w(d, H), p + "mlp.up_proj.weight": w(d, H), p + "mlp.down_proj.weight": w(H, d)}
    return t


def write_llada_dir(path, cfg: dict, tensors: dict, mask_id: int = MASK) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    # the mask id lives in the tokenizer, as in the released model
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": {str(mask_id): {"content": "<|mask|>", "special": True}}}, f)


# ---- an independent, plain forward of the format (written from its definition, not ecdlm's) ----
def rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-b, a), dim=-1)


def llada_reference_logits(c: dict, t: dict, ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    B, L = ids.shape
    H, nh, nkv, eps = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    hd = H // nh
    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.arange(L, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    x = t["model.embed_tokens.weight"][ids]
    bias = None if attention_mask is None else torch.where(attention_mask.bool(), 0.0, float("-inf"))[:, None, None, :]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, t[p + "input_layernorm.weight"], eps)
        q, k, v = h @ t[p + "self_attn.q_proj.weight"].T, h @ t[p + "self_attn.k_proj.weight"].T, h @ t[p + "self_attn.v_proj.weight"].T
        q = rms(q.reshape(-1, hd), t[p + "self_attn.q_norm.weight"], eps).reshape(B, L, nh, hd).transpose(1, 2)
        k = rms(k.reshape(-1, hd), t[p + "self_attn.k_norm.weight"], eps).reshape(B, L, nkv, hd).transpose(1, 2)
        v = v.reshape(B, L, nkv, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        scores = q @ k.transpose(2, 3) / math.sqrt(hd)
        if bias is not None:
            scores = scores + bias
        a = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, L, H)
        x = x + a @ t[p + "self_attn.o_proj.weight"].T
        h = rms(x, t[p + "post_attention_layernorm.weight"], eps).reshape(B * L, H)
        out = torch.zeros_like(h)
        if c["moe_layer_freq"][i]:
            probs = torch.softmax((h @ t[p + "mlp.gate.weight"].T).float(), dim=1)
            if p + "mlp.expert_bias" in t:
                probs = probs + t[p + "mlp.expert_bias"]
            gates, chosen = probs.topk(c["num_experts_per_tok"], dim=-1)    # no renormalization
            for tok in range(B * L):
                for slot in range(chosen.shape[1]):
                    e = f"{p}mlp.experts.{int(chosen[tok, slot])}."
                    y = F.silu(h[tok] @ t[e + "gate_proj.weight"].T) * (h[tok] @ t[e + "up_proj.weight"].T)
                    out[tok] += gates[tok, slot] * (y @ t[e + "down_proj.weight"].T)
        else:
            y = F.silu(h @ t[p + "mlp.gate_proj.weight"].T) * (h @ t[p + "mlp.up_proj.weight"].T)
            out = y @ t[p + "mlp.down_proj.weight"].T
        x = x + out.reshape(B, L, H)
    return rms(x, t["model.norm.weight"], eps) @ t["lm_head.weight"].T


def ecdlm_logits(cfg: ModelConfig, state: dict, ids, valid=None) -> torch.Tensor:
    model = DiffusionTransformer(cfg).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(ids, valid_BL=valid).logits


@pytest.mark.parametrize("variant", ["bias_gqa", "no_bias_dense_layer"])
def test_llada_moe_import_matches_an_independent_reference_forward(tmp_path, variant):
    over = {} if variant == "bias_gqa" else {"moe_router_enable_expert_bias": False, "moe_layer_freq": [0, 1],
                                              "num_key_value_heads": 4}
    c = llada_fields(**over)
    tensors = random_llada_tensors(c)
    write_llada_dir(tmp_path / "llada", c, tensors)
    cfg, state = load_hf_dir(str(tmp_path / "llada"))
    assert cfg.model.mask_id == MASK and cfg.moe.router == "token_choice" and not cfg.moe.renormalize
    assert cfg.moe.expert_bias_in_gates == c["moe_router_enable_expert_bias"]
    ids = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = llada_reference_logits(c, tensors, ids)
    got = ecdlm_logits(cfg, state, ids)
    assert float((got - ref).abs().max()) < 1e-5
    # with key padding: LLaDA-MoE's 2-D attention mask against ecdlm's valid mask (at the real
    # positions: ecdlm routes pads nowhere, LLaDA-MoE routes them too, and nothing attends to them)
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, :3] = False
    diff = ecdlm_logits(cfg, state, ids, valid) - llada_reference_logits(c, tensors, ids, valid)
    assert float(diff[valid].abs().max()) < 1e-5


def test_the_bias_changes_the_gates_not_only_the_selection(tmp_path):
    """The reference check above would pass for a selection-only bias too if the bias were tiny;
    here the gates differ by the bias itself, so a selection-only model misses by about that much."""
    c = llada_fields()
    tensors = random_llada_tensors(c)
    for i in range(2):
        tensors[f"model.layers.{i}.mlp.expert_bias"] = torch.full((8,), 0.3)
    write_llada_dir(tmp_path / "llada", c, tensors)
    cfg, state = load_hf_dir(str(tmp_path / "llada"))
    ids = torch.randint(0, 40, (1, 9), generator=torch.Generator().manual_seed(2))
    ref = llada_reference_logits(c, tensors, ids)
    assert (ecdlm_logits(cfg, state, ids) - ref).abs().max() < 1e-5
    selection_only = from_dict(ModelConfig, {**_sections(cfg), "moe": {**_sections(cfg)["moe"], "expert_bias_in_gates": False,
                                                                       "bias_update_rate": 1e-3}})
    assert (ecdlm_logits(selection_only, state, ids) - ref).abs().max() > 1e-2


def _sections(cfg: ModelConfig) -> dict:
    from evaluation.hf.ecdlm_format import sections
    return sections(cfg)


def test_export_back_to_llada_moe_gives_identical_tensors(tmp_path):
    c = llada_fields()
    tensors = random_llada_tensors(c)
    write_llada_dir(tmp_path / "llada", c, tensors)
    cfg, state = load_hf_dir(str(tmp_path / "llada"))
    back = {n: t for name, tensor in state.items() for n, t in llada_tensors(cfg, name, tensor)}
    assert sorted(back) == sorted(tensors)
    for name, t in tensors.items():
        assert back[name].shape == t.shape and torch.equal(back[name], t), name
    out = llada_config(cfg, eos_id=2)
    for key in ("num_experts", "num_experts_per_tok", "expert_intermediate_size", "moe_layer_freq", "qk_layernorm",
                "moe_router_enable_expert_bias", "norm_topk_prob", "partial_rotary_factor", "rope_theta",
                "rms_norm_eps", "tie_word_embeddings", "num_key_value_heads", "model_type", "architectures"):
        assert out[key] == c[key], key
    assert "shared_expert_intermediate_size" in out and out["shared_expert_intermediate_size"] is None


def test_import_cli_writes_a_run_that_the_tools_load_and_export_round_trips(tmp_path):
    c = llada_fields()
    tensors = random_llada_tensors(c)
    write_llada_dir(tmp_path / "llada", c, tensors)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "evaluation.hf", "import", str(tmp_path / "llada"), str(tmp_path / "run")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    from evaluation.loading import load_model_for_inference
    model, _ = load_model_for_inference(str(tmp_path / "run"))
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids).logits - llada_reference_logits(c, tensors, ids)).abs().max() < 1e-5
    out = subprocess.run([sys.executable, "-m", "evaluation.hf", "export", str(tmp_path / "run"), str(tmp_path / "back"),
                          "--format", "llada-moe"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    back = read_safetensors_dir(str(tmp_path / "back"))
    assert sorted(back) == sorted(tensors)
    assert all(torch.equal(back[n], t) for n, t in tensors.items())
    written = json.load(open(tmp_path / "back" / "config.json"))
    assert written["moe_router_enable_expert_bias"] is True and written["shared_expert_intermediate_size"] is None


@pytest.mark.parametrize("field,value", [("router_num_group", 4), ("partial_rotary_factor", 0.5),
                                         ("clip_qkv", 8.0), ("norm_topk_prob", True), ("moe_layer_freq", [1, 0])])
def test_unrepresentable_llada_fields_are_refused_by_name(tmp_path, field, value):
    c = llada_fields(**{field: value})
    write_llada_dir(tmp_path / "d", c, random_llada_tensors(llada_fields()))
    with pytest.raises(FormatError, match=field):
        load_hf_dir(str(tmp_path / "d"))


def test_missing_mask_token_is_refused_with_the_options(tmp_path):
    c = llada_fields()
    write_llada_dir(tmp_path / "d", c, random_llada_tensors(c))
    os.remove(tmp_path / "d" / "tokenizer_config.json")
    with pytest.raises(FormatError, match="--mask-id"):
        load_hf_dir(str(tmp_path / "d"))
    assert load_hf_dir(str(tmp_path / "d"), mask_id=7)[0].model.mask_id == 7


def test_expert_choice_runs_do_not_fit_llada_moe_and_every_mismatch_is_named():
    from tests.evaluation.conftest import tiny_config
    with pytest.raises(FormatError, match="moe.router=expert_choice"):
        llada_config(tiny_config("expert_choice"))
    tc = from_dict(ModelConfig, {"model": {"vocab_size": 32, "d_model": 32, "n_layers": 2, "n_heads": 2, "logit_softcap": 30.0},
                                 "moe": {"router": "token_choice", "num_experts": 4, "expert_hidden": 8, "k": 2,
                                         "capacity_factor": 1.25}})
    with pytest.raises(FormatError) as err:
        llada_config(tc)
    for name in ("moe.renormalize", "moe.capacity_factor", "model.logit_softcap"):
        assert name in str(err.value)


def test_llada_moe_7b_preset_parameter_counts():
    cfg = load_config(os.path.join(ROOT, "configs", "llada_moe_7b.yaml"))
    counts = ModelConfig(model=cfg.model, moe=cfg.moe, diffusion=cfg.diffusion).param_counts()
    assert counts["total"] == 7_356_880_896          # the released shards' parameter count
    assert 1.35e9 < counts["active_compute"] < 1.45e9   # "A1B": ~1.4B active, head counted, input embedding not
    assert counts["active_compute"] == counts["active"] - 157184 * 2048


# ---- ecdlm-format exports through transformers' remote code, in a process without ecdlm ----------
HF_SCRIPT = r'''
"""Loads each export with transformers (trust_remote_code), writes its logits for the given inputs,
and greedy-samples through the HF model as ecdlm's sampler does at temperature 0."""
import importlib.util, json, math, sys
import torch
from safetensors.torch import load_file, save_file
assert importlib.util.find_spec("model") is None and importlib.util.find_spec("evaluation") is None, sys.path
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

def greedy(model, prompt_ids, gen, steps, mask_id):
    x = torch.tensor([prompt_ids + [mask_id] * gen])
    P = len(prompt_ids)
    for s in range(steps):
        todo = x[0] == mask_id
        todo[:P] = False
        n = int(todo.sum())
        k = -(-n // (steps - s))
        if k == 0:
            continue
        logits = model(x).logits[0].double()
        logits[:, mask_id] = float("-inf")
        tok = logits.argmax(-1)
        conf = torch.softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
        conf[~todo] = float("-inf")
        order = torch.argsort(conf, descending=True, stable=True)[:k]
        x[0, order] = tok[order]
    return x[0, P:].tolist()

jobs = json.load(open(sys.argv[1]))
result = {}
for job in jobs:
    cls = AutoModel if job.get("auto_model") else AutoModelForMaskedLM
    model = cls.from_pretrained(job["dir"], trust_remote_code=True).eval()
    inputs = load_file(job["inputs"])
    with torch.no_grad():
        logits = model(inputs["ids"], attention_mask=inputs["valid"].long()).logits
        save_file({"logits": logits.contiguous()}, job["out"])
        if "prompt" in job:
            tok = AutoTokenizer.from_pretrained(job["dir"])
            ids = tok(job["prompt"])["input_ids"]
            result[job["dir"]] = {"prompt_ids": ids, "completion_ids": greedy(model, ids, job["gen"], job["gen"],
                                                                              model.config.mask_token_id)}
json.dump(result, open(sys.argv[2], "w"))
'''


def run_without_repo(tmp_path, jobs: list) -> dict:
    """Run HF_SCRIPT from a directory outside the repository, with no PYTHONPATH: sys.path holds
    the script's directory and site-packages only, so `model`/`evaluation` cannot be imported."""
    work = tmp_path / "outside"
    work.mkdir(exist_ok=True)
    (work / "hf_check.py").write_text(HF_SCRIPT)
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(work / "hf_check.py"), str(work / "jobs.json"), str(work / "result.json")],
                          cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((work / "result.json").read_text())


def strong_random_state(model: DiffusionTransformer, seed: int) -> dict:
    """Weights large enough that routing decides the output (the default init's experts are tiny),
    and a nonzero expert bias, so a wrong selection or gate shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("norm.weight"):
            out[name] = 1 + 0.1 * torch.randn(t.shape, generator=g)
        elif name.endswith("expert_bias"):
            out[name] = 0.05 * torch.randn(t.shape, generator=g)
        else:
            out[name] = 0.4 * torch.randn(t.shape, generator=g)
    return out


def variant_config(name: str) -> ModelConfig:
    model = {"vocab_size": 32, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 32}
    ec = {"router": "expert_choice", "num_experts": 4, "expert_hidden": 16, "k": 2}
    sched = {"k_min": 1, "k_max": 4, "flop_match": "off"}
    variants = {f"ec_{s}": {**ec, "capacity": {"schedule": s, **sched}}
                for s in ("linear", "linear_reverse", "cosine", "cosine_reverse", "bell", "gaussian", "gaussian_reverse")}
    variants |= {
        "ec_piecewise": {**ec, "capacity": {"schedule": "piecewise", "points": [[0, 0], [0.3, 1], [1, 0.2]], **sched}},
        "ec_static": {**ec, "capacity": {"schedule": "static"}},
        "ec_batch_scaled_shared": {**ec, "ec_scope": "batch", "gate_scaling": True, "num_shared_experts": 1,
                                   "capacity": {"schedule": "linear_reverse", **sched}},
        "ec_sequence_scaled": {**ec, "gate_scaling": True, "capacity": {"schedule": "cosine", **sched}},
        "ec_batch_reference": {**ec, "ec_scope": "batch", "ec_batch_capacity": "reference_max", "num_shared_experts": 1,
                               "gate_scaling": "reference", "capacity": {"schedule": "bell", **sched},
                               "dense_hidden": 24, "moe_every": 2},
        "ec_half_even": {**ec, "capacity": {"schedule": "linear", "rounding": "half_even", **sched}},
        "tc_softmax_renorm": {"router": "token_choice", "num_experts": 4, "expert_hidden": 16, "k": 2},
        "tc_sigmoid_capacity_bias": {"router": "token_choice", "num_experts": 4, "expert_hidden": 16, "k": 2,
                                     "score_fn": "sigmoid", "capacity_factor": 0.75, "bias_update_rate": 1e-3},
        "tc_bias_in_gates": {"router": "token_choice", "num_experts": 4, "expert_hidden": 16, "k": 2,
                             "renormalize": False, "expert_bias_in_gates": True, "moe_every": 2},
        "dense": {"router": "dense", "dense_hidden": 24},
    }
    return from_dict(ModelConfig, {"model": model, "moe": variants[name]})


VARIANTS = ["ec_linear", "ec_linear_reverse", "ec_cosine", "ec_cosine_reverse", "ec_bell", "ec_gaussian",
            "ec_gaussian_reverse", "ec_piecewise", "ec_static", "ec_batch_scaled_shared", "ec_sequence_scaled",
            "ec_batch_reference", "ec_half_even",
            "tc_softmax_renorm", "tc_sigmoid_capacity_bias", "tc_bias_in_gates", "dense"]


def masked_inputs(seed: int, mask_id: int = 3) -> dict:
    """Three sequences at different mask ratios (so dynamic capacities differ), one left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 32, (3, 24), generator=g)
    for b, n in enumerate((2, 12, 20)):
        ids[b, torch.randperm(24, generator=g)[:n]] = mask_id
    valid = torch.ones(3, 24, dtype=torch.bool)
    valid[2, :5] = False
    ids[2, :5] = 0
    return {"ids": ids, "valid": valid}


def test_remote_code_reproduces_ecdlm_for_every_router_and_schedule(tmp_path):
    from evaluation.hf.export import write_hf_dir
    from evaluation.inference import mask_ratio
    jobs, refs = [], {}
    for i, name in enumerate(VARIANTS):
        cfg = variant_config(name)
        model = DiffusionTransformer(cfg).eval()
        model.load_state_dict(strong_random_state(model, i))
        inputs = masked_inputs(i)
        with torch.no_grad():
            ref = model(inputs["ids"], mask_ratio(inputs["ids"], inputs["valid"], 3), inputs["valid"]).logits
        out = tmp_path / name
        write_hf_dir(cfg, model.state_dict().items(), str(out))
        save_file(inputs, str(tmp_path / f"{name}.in.safetensors"))
        jobs.append({"dir": str(out), "inputs": str(tmp_path / f"{name}.in.safetensors"),
                     "out": str(tmp_path / f"{name}.out.safetensors"), "auto_model": i % 2 == 0})
        refs[name] = (ref, inputs["valid"])
    run_without_repo(tmp_path, jobs)
    for name, (ref, valid) in refs.items():
        got = read_safetensors_file(tmp_path / f"{name}.out.safetensors")["logits"]
        assert float((got - ref)[valid].abs().max()) < 1e-5, name
        assert float(ref[valid].std()) > 0.1, name   # not a trivially flat output


def read_safetensors_file(path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def test_exported_config_holds_every_field_and_the_capacity_schedule(tmp_path):
    from evaluation.hf.export import write_hf_dir
    cfg = variant_config("ec_piecewise")
    write_hf_dir(cfg, DiffusionTransformer(cfg).state_dict().items(), str(tmp_path / "x"))
    written = json.load(open(tmp_path / "x" / "config.json"))
    assert written["auto_map"]["AutoModelForMaskedLM"] == "modeling_ecdlm.EcdlmForMaskedLM"
    assert written["auto_map"]["AutoModel"] and written["auto_map"]["AutoConfig"]
    from evaluation.hf.ecdlm_format import sections
    assert written["ecdlm"] == json.loads(json.dumps(sections(cfg)))
    assert written["ecdlm"]["moe"]["capacity"]["points"] == [[0, 0], [0.3, 1], [1, 0.2]]
    for code in ("configuration_ecdlm.py", "modeling_ecdlm.py"):
        text = (tmp_path / "x" / code).read_text()
        imports = {line.split()[1].split(".")[0] for line in text.splitlines() if line.startswith(("import ", "from "))}
        assert imports <= {"math", "torch", "transformers", ""}, (code, imports)
    cfg2, state = load_hf_dir(str(tmp_path / "x"))
    assert cfg2 == cfg and set(state) == set(DiffusionTransformer(cfg).state_dict())


# ---- trained runs: real trainer launches, exported by the CLI ------------------------------------
def start_twin_runs(small_corpus, root):
    """A dense run (1 process, 24 steps), and two 2-step EC runs on the same batches: 1 process
    (ep=1) and 2 processes through the deepspeed launcher with moe.ep_size=2."""
    from tests.evaluation.conftest import start_run
    from tests.trainer.launch import launch, tiny_overrides
    short = {"train.max_steps": 2, "train.save_every": 2, "train.eval_every": 2}
    procs = {"dense": start_run(small_corpus, root / "dense", **{"moe.router": "dense"}),
             "ep1": start_run(small_corpus, root / "ep1", **short)}
    try:
        launch(2, tiny_overrides(small_corpus, root / "ep2", **short, **{"moe.ep_size": 2}), timeout=900)
        for name, p in procs.items():
            out, _ = p.communicate(timeout=900)
            assert p.returncode == 0, f"{name} run failed:\n{out[-4000:]}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return {name: root / name for name in ("dense", "ep1", "ep2")}


@pytest.fixture(scope="module")
def runs(two_runs, small_corpus, tmp_path_factory):
    return {**two_runs, **start_twin_runs(small_corpus, tmp_path_factory.mktemp("hf_runs"))}


def export_cli(run, out, *extra) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "evaluation.hf", "export", str(run), str(out), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc


def sample_cli(run, prompt, gen) -> list:
    proc = subprocess.run([sys.executable, "-m", "evaluation.sample", str(run), "--prompt", prompt, "--gen-length",
                           str(gen), "--steps", str(gen), "--temperature", "0", "--json", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip().splitlines()[0])
    assert isinstance(row["completion"], str) and len(row["completion_ids"]) == gen
    return row["completion_ids"]


def test_trained_runs_load_through_transformers_match_logits_and_sample_the_same(runs, tmp_path):
    from evaluation.loading import load_run
    from evaluation.inference import mask_ratio
    prompt, gen = "def add(a, b):\n    return", 12
    jobs, refs, sampled = [], {}, {}
    for name in ("ec", "tc", "dense"):
        out = tmp_path / name
        # the EC export is sharded: transformers then loads it through model.safetensors.index.json
        export_cli(runs[name], out, *(["--max-shard-size", "64KB"] if name == "ec" else []))
        model, cfg, tok = load_run(str(runs[name]))
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(4, 1024, (3, 40), generator=g)
        ids[torch.rand(3, 40, generator=g) < torch.tensor([[0.1], [0.5], [0.9]])] = cfg.model.mask_id
        valid = torch.ones_like(ids, dtype=torch.bool)
        valid[1, :6] = False
        ids[1, :6] = cfg.model.pad_id
        with torch.no_grad():
            refs[name] = (model(ids, mask_ratio(ids, valid, cfg.model.mask_id), valid).logits, valid)
        save_file({"ids": ids, "valid": valid}, str(tmp_path / f"{name}.in.safetensors"))
        jobs.append({"dir": str(out), "inputs": str(tmp_path / f"{name}.in.safetensors"),
                     "out": str(tmp_path / f"{name}.out.safetensors"), "prompt": prompt, "gen": gen})
        sampled[name] = (tok.encode(prompt), sample_cli(runs[name], prompt, gen))
    assert len([f for f in os.listdir(tmp_path / "ec") if f.endswith(".safetensors")]) > 1
    assert os.path.exists(tmp_path / "ec" / "model.safetensors.index.json")
    result = run_without_repo(tmp_path, jobs)
    for name, (ref, valid) in refs.items():
        got = read_safetensors_file(tmp_path / f"{name}.out.safetensors")["logits"]
        assert float((got - ref)[valid].abs().max()) < 1e-5, name
        hf = result[str(tmp_path / name)]
        assert hf["prompt_ids"] == sampled[name][0], name            # AutoTokenizer encodes as ecdlm does
        assert hf["completion_ids"] == sampled[name][1], name         # greedy HF sampling = evaluation.sample


def test_sharded_export_reloads_to_the_same_state(runs, tmp_path):
    from rundir.state import full_model_state
    from rundir.safetensors_io import INDEX
    export_cli(runs["tc"], tmp_path / "sharded", "--max-shard-size", "50KB")
    index = json.load(open(tmp_path / "sharded" / INDEX))
    files = set(index["weight_map"].values())
    per_file = {f: [t for t, g in index["weight_map"].items() if g == f] for f in files}
    # every shard holds at most 50 KB of tensors, or one tensor that is bigger by itself
    assert len(files) > 3 and all(len(names) == 1 or os.path.getsize(tmp_path / "sharded" / f) < 50_000 + 8_000
                                  for f, names in per_file.items())
    cfg, state = load_hf_dir(str(tmp_path / "sharded"))
    ckpt_state = full_model_state(str(sorted((runs["tc"] / "checkpoints").glob("step_*"))[-1]))
    assert sorted(state) == sorted(ckpt_state) and all(torch.equal(state[k], ckpt_state[k]) for k in state)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())


def test_export_of_an_ep2_checkpoint_equals_the_ep1_one(runs, tmp_path):
    """The 2-process ep=2 checkpoint holds its experts in two rank files; the export reassembles
    them. Same initial weights and batches, 2 steps: equal up to the float rounding of the
    different reduction order (the trainer's own tests bound the losses the same way)."""
    export_cli(runs["ep1"], tmp_path / "ep1")
    export_cli(runs["ep2"], tmp_path / "ep2")
    a, b = read_safetensors_dir(str(tmp_path / "ep1")), read_safetensors_dir(str(tmp_path / "ep2"))
    assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a)
    experts = [k for k in a if "experts" in k]
    assert experts and all(a[k].shape[0] == 16 for k in experts)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    ca, cb = (json.load(open(tmp_path / d / "config.json")) for d in ("ep1", "ep2"))
    assert ca["ecdlm"] == cb["ecdlm"] and cb["ecdlm"]["moe"]["ep_size"] == 1


def test_a_run_that_does_not_fit_llada_moe_is_refused_before_writing(runs, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "evaluation.hf", "export", str(runs["ec"]), str(tmp_path / "x"),
                           "--format", "llada-moe"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "moe.router=expert_choice" in proc.stderr
    assert not (tmp_path / "x").exists()


# ---- Hugging Face tokenizer.json wherever the sentencepiece model is used -------------------------
def test_prepare_with_a_tokenizer_json_writes_the_same_tokens_as_the_sentencepiece_model(small_corpus, tmp_path):
    """The converted tokenizer.json (what an ecdlm export ships) given to `trainer.data prepare
    --tokenizer` yields byte-identical shards, and the evaluation loader reads it."""
    from evaluation.hf.tokenizer import sentencepiece_to_tokenizer_json
    from rundir.tokenizer import data_tokenizer
    from rundir.tokenizer import load_tokenizer as load_sp
    sp, info = load_sp(str(small_corpus / "tokenizer.model"))
    tok_json = tmp_path / "tokenizer.json"
    tok_json.write_text(sentencepiece_to_tokenizer_json(sp))
    out = tmp_path / "prepared"
    proc = subprocess.run([sys.executable, "-m", "trainer.data", "prepare", "--out", str(out), "--max-docs", "150",
                           "--tokenizer", str(tok_json), "--num-workers", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for split in ("train", "val"):
        ours = sorted(p.relative_to(out) for p in (out / split).rglob("*") if p.suffix in (".bin", ".npy"))
        theirs = sorted(p.relative_to(small_corpus) for p in (small_corpus / split).rglob("*") if p.suffix in (".bin", ".npy"))
        assert ours == theirs and ours
        for rel in ours:
            assert (out / rel).read_bytes() == (small_corpus / rel).read_bytes(), rel
    hf = data_tokenizer(str(tmp_path))   # a directory holding only tokenizer.json
    assert (hf.pad_id, hf.eod_id, hf.mask_id, hf.vocab_size) == (info.pad_id, info.eod_id, info.mask_id, info.vocab_size)
    text = "def add(a, b):\n    return a + b  # 42\n\tüñí 🙂"
    assert hf.encode(text) == list(sp.encode(text)) and hf.decode(hf.encode(text)) == text
