"""ecdlm's own Hugging Face format: config.json holding every model, moe and diffusion field (the
capacity schedule included, so an exported expert-choice model samples with the same capacities),
tensors under ecdlm's own state-dict names, and remote code registered through `auto_map`."""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Optional

from model.config import ModelConfig, from_dict
from model.moe.routing import gate_scale_table

MODEL_TYPE = "ecdlm"
ARCHITECTURE = "EcdlmForMaskedLM"
TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
CODE_FILES = ("configuration_ecdlm.py", "modeling_ecdlm.py")
AUTO_MAP = {"AutoConfig": "configuration_ecdlm.EcdlmConfig",
            "AutoModel": "modeling_ecdlm.EcdlmForMaskedLM",
            "AutoModelForMaskedLM": "modeling_ecdlm.EcdlmForMaskedLM"}


def sections(mc: ModelConfig) -> dict:
    """Every model, moe and diffusion field of a resolved ModelConfig, as plain data."""
    return {"model": dataclasses.asdict(mc.model), "moe": dataclasses.asdict(mc.moe),
            "diffusion": dataclasses.asdict(mc.diffusion)}


def ecdlm_config(mc: ModelConfig, eos_id: Optional[int] = None, dtype: str = "float32") -> dict:
    m, e = mc.model, mc.moe
    data = sections(mc)
    data["moe"]["ep_size"] = 1   # the exported model is one process with every expert
    cfg = {"architectures": [ARCHITECTURE], "auto_map": AUTO_MAP, "model_type": MODEL_TYPE, "ecdlm": data,
           # the usual names, for tools that read them (the model itself reads only `ecdlm`)
           "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
           "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads or m.n_heads,
           "max_position_embeddings": m.max_seq_len, "pad_token_id": m.pad_id, "mask_token_id": m.mask_id,
           "eos_token_id": eos_id, "tie_word_embeddings": False, "torch_dtype": dtype}
    if e.router == "expert_choice" and e.gate_scaling != "off":
        # ecdlm estimates f(n) by a seeded Monte Carlo; the table itself travels, so the remote
        # code needs no generator that matches torch's bit for bit (rms or reference alike)
        cfg["gate_scale_table"] = gate_scale_table(e.num_experts, method=e.gate_scaling,
                                                   num_shared=e.num_shared_experts).tolist()
    return cfg


def model_config_from_ecdlm(hf: dict) -> ModelConfig:
    data = {k: dict(v) for k, v in hf["ecdlm"].items()}
    data["moe"]["ep_size"] = 1
    return from_dict(ModelConfig, data)


def copy_code(out_dir: str) -> None:
    for name in CODE_FILES:
        shutil.copyfile(os.path.join(TEMPLATES, name), os.path.join(out_dir, name))
