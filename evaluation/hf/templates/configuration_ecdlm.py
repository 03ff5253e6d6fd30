"""Configuration of an ecdlm masked diffusion LM exported for Hugging Face transformers.

Self-contained: imports only transformers. Every model, moe and diffusion field of the ecdlm
run lives under `ecdlm` (sections "model", "moe", "diffusion"), the capacity schedule included.
"""
from transformers import PretrainedConfig


class EcdlmConfig(PretrainedConfig):
    model_type = "ecdlm"

    def __init__(self, ecdlm=None, gate_scale_table=None, mask_token_id=None, **kwargs):
        self.ecdlm = ecdlm or {"model": {}, "moe": {}, "diffusion": {}}
        self.gate_scale_table = gate_scale_table   # f(n) per experts-per-token n, EC gate scaling
        m = self.ecdlm.get("model", {})
        self.mask_token_id = mask_token_id if mask_token_id is not None else m.get("mask_id")
        kwargs.setdefault("pad_token_id", m.get("pad_id"))
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
