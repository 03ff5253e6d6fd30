"""`init.from`: a new run starts from another model's weights, and nothing else of it.

    init.from=runs/tc-pretrain                 an ecdlm run (its newest complete checkpoint)
    init.from=runs/tc-pretrain/checkpoints/step_00001000   one checkpoint, any layout
    init.from=LLaDA-MoE-7B-A1B-Base            a Hugging Face directory (LLaDA-MoE, an ecdlm export,
                                               or qwen3_moe / olmoe: their mask is model.mask_id)

The optimizer is fresh and the step is 0. Every tensor of the configured model must come from the
source with the same (full, all-experts) shape; each that does not is named with both shapes, and
so is every tensor one side has and the other lacks, all in one error before any weight is copied.

Retrofit: the router's weights W_r are ordinary tensors, so a token-choice source loads into an
expert-choice model unchanged; only the selection rule differs (moe.router, any capacity
schedule). The token-choice-only state, the per-expert selection biases, is dropped (logged) when
the configured model does not use them. TC to TC and EC to EC load everything.

Under expert parallelism each rank copies its own experts' rows. Weights are read from the source
on every rank (memory-mapped safetensors: one tensor at a time for ecdlm checkpoints).
"""
from __future__ import annotations

import logging
import os
from typing import Iterator, Optional

import torch

from model.config import ConfigError, ModelConfig
from rundir.state import checkpoint_and_config, iter_model_state

from .hooks import RunHooks

log = logging.getLogger("ecdlm")

EXPERT_BIAS = "expert_bias"   # the TC selection-bias buffer of every MoE layer


def source_kind(path: str) -> str:
    """"hf" (config.json: a Hugging Face directory) or "ecdlm" (a run or checkpoint directory)."""
    if not os.path.isdir(path):
        raise ConfigError(f"init.from={path} is not a directory (expected an ecdlm run or checkpoint "
                          f"directory, or a Hugging Face directory with config.json)")
    return "hf" if os.path.exists(os.path.join(path, "config.json")) else "ecdlm"


def read_source(path: str, hooks: RunHooks, mask_id: Optional[int] = None
                ) -> tuple[Optional[ModelConfig], Iterator[tuple[str, torch.Tensor]]]:
    """(the source's ModelConfig, (name, full tensor) pairs in ecdlm's naming). Hugging Face
    directories are read by the reader the entry point handed over (evaluation/hf owns them).
    `mask_id`: the mask of an autoregressive Hugging Face source whose tokenizer names none (the
    configured one)."""
    if source_kind(path) == "hf":
        mc, state = hf_reader(hooks, path)[0](path, fallback_mask_id=mask_id)
        return mc, iter(state.items())
    try:
        ckpt, run_cfg = checkpoint_and_config(path)
    except FileNotFoundError as err:
        raise ConfigError(f"init.from={path}: {err} (expected an ecdlm run or checkpoint directory)") from None
    log.info("init.from: checkpoint %s", ckpt)
    return run_cfg.model_config, iter_model_state(ckpt)


def check_compatible(source: Optional[ModelConfig], target: ModelConfig, path: str) -> None:
    """Token ids that would change meaning under the same weights: refused."""
    if source is None:
        return
    for name in ("mask_id", "pad_id"):
        was, now = getattr(source.model, name), getattr(target.model, name)
        if was != now:
            raise ConfigError(f"init.from={path}: model.{name} is {was} there, {now} here; the embeddings "
                              f"would read token {now} as another token (set model.{name}={was})")


def expert_rows(model) -> dict:
    """{state-dict name: (first global expert, local experts)} of the routed experts' tensors."""
    rows = {}
    for name, module in model.named_modules():
        if hasattr(module, "first_expert") and hasattr(module, "num_local"):
            for pname, _ in module.named_parameters(recurse=False):
                rows[f"{name}.{pname}"] = (module.first_expert, module.num_local)
    return rows


def full_shape(name: str, local: torch.Tensor, num_experts: int, rows: dict) -> tuple:
    """The all-experts shape of a local tensor (routed experts are split on dim 0)."""
    return (num_experts, *local.shape[1:]) if name in rows else tuple(local.shape)


def hf_reader(hooks: RunHooks, path: str) -> tuple:
    if hooks.read_hf_dir is None or hooks.check_hf_dir is None:
        raise ConfigError(f"init.from={path} is a Hugging Face directory, and this entry point reads none "
                          f"(start the run with train.py, or import it first: python -m evaluation.hf import)")
    return hooks.read_hf_dir, hooks.check_hf_dir


def load_initial_weights(model, cfg, path: str, hooks: RunHooks = RunHooks()) -> dict:
    """Copy the source's weights into `model` (before DeepSpeed wraps it), one tensor at a time.
    Returns {"loaded": n, "dropped": [names], "source_router": ...}. Raises ConfigError naming
    every mismatch (the half-filled model is then never used: the run stops)."""
    source_cfg, tensors = read_source(path, hooks, cfg.model_config.model.mask_id)
    check_compatible(source_cfg, cfg.model_config, path)
    target = model.state_dict()
    rows = expert_rows(model)
    E = cfg.moe.num_experts
    keep_bias = cfg.moe.router == "token_choice"   # TC to TC keeps everything; EC has no use for it
    problems, dropped, loaded = [], [], 0
    seen = set()
    for name, tensor in tensors:
        seen.add(name)
        if name.endswith("." + EXPERT_BIAS) and name in target and not keep_bias:
            if tensor.abs().max().item() > 0:   # all-zero biases carry nothing: nothing to report
                dropped.append(name)
            continue
        if name not in target:
            problems.append(f"{name}: in the source, not in the configured model")
            continue
        want = full_shape(name, target[name], E, rows)
        if tuple(tensor.shape) != want:
            problems.append(f"{name}: source shape {list(tensor.shape)}, configured {list(want)}")
            continue
        if name in rows:
            first, n = rows[name]
            tensor = tensor[first:first + n]
        with torch.no_grad():
            target[name].copy_(tensor.to(target[name].dtype))
        loaded += 1
    for name in target:
        if name not in seen and not name.endswith("." + EXPERT_BIAS):
            problems.append(f"{name}: in the configured model, not in the source")
    if problems:
        raise ConfigError(f"init.from={path}: {len(problems)} tensor(s) do not fit the configured model:\n  "
                          + "\n  ".join(problems[:50]) + ("\n  ..." if len(problems) > 50 else ""))
    report = {"loaded": loaded, "dropped": sorted(dropped),
              "source_router": source_cfg.moe.router if source_cfg is not None else None}
    log.info("init.from=%s: %d tensors loaded (source router %s, configured %s); optimizer fresh, step 0",
             path, report["loaded"], report["source_router"], cfg.moe.router)
    if dropped:
        log.info("init.from: dropped the token-choice expert biases of %d layers (the configured %s model "
                 "does not use them): %s", len(dropped), cfg.moe.router, ", ".join(dropped))
    return report


def check_init_source(path: str, target: ModelConfig, hooks: RunHooks = RunHooks()) -> None:
    """Preflight: the source exists and is readable as what it claims to be, and its token ids
    agree, without reading any weights (shapes are checked tensor by tensor when they load)."""
    if source_kind(path) == "hf":
        hf_reader(hooks, path)[1](path)
        return
    try:
        _, run_cfg = checkpoint_and_config(path)
    except FileNotFoundError as err:
        raise ConfigError(f"init.from={path}: {err} (expected an ecdlm run or checkpoint directory)") from None
    check_compatible(run_cfg.model_config, target, path)
