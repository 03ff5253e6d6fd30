"""Hugging Face interop: export any run as safetensors (ecdlm's format with remote code, or
LLaDA-MoE's), and import LLaDA-MoE-format or ecdlm-format directories (`load_hf_dir`).

    python -m evaluation.hf export RUN_OR_CHECKPOINT OUT_DIR [--format ecdlm|llada-moe] [--dtype ...]
    python -m evaluation.hf import HF_DIR OUT_RUN [--mask-id ID | --mask-token TEXT | --add-mask-token] [--pad-id ID]
"""
