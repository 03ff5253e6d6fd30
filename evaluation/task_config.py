"""The on-the-fly evaluation tasks' config (YAML `eval.tasks`, a list of these) and its checks.
The run config holds the tasks as plain mappings; their meaning belongs here, beside the code that
runs them (evaluation/tasks.py), and the entry point checks them before training starts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

from model.config import ConfigError, from_dict


@dataclass
class EvalTaskConfig:
    """One on-the-fly task (evaluation/tasks.py): multiple choice (single_mask, likelihood; logged
    as eval/<name>/acc) or greedy generation (generate; eval/<name>/exact_match). Its file is
    checked in the trainer's preflight, not here, so an old run's config still loads."""
    name: str = ""
    path: str = ""                            # JSON lines: question/context, choices, answer (MC);
                                              # prompt (or question), answer (or response) (generate)
    mode: Literal["single_mask", "likelihood", "generate"] = "single_mask"
    every: int = 1                            # steps between evaluations
    limit: Optional[int] = None               # first N questions only
    mc_num: int = 16                          # Monte-Carlo samples per choice (likelihood)
    batch_size: int = 32                      # questions per forward (MC) / prompts per generate call
    seed: int = 0
    # generate mode (evaluation/generation_tasks.py)
    answer_regex: Optional[str] = None        # first match (group 1 if any) of completion and reference
    gen_length: int = 32                      # tokens generated per prompt
    steps: Optional[int] = None               # denoising steps; default gen_length
    block_length: Optional[int] = None        # semi-autoregressive block; default gen_length
    stop: list[str] = field(default_factory=list)   # strings that end a completion (besides end-of-text)
    decoding: str = "fixed"                   # or threshold (docs/sampling.md)
    threshold: float = 0.9                    # confidence that commits a position (decoding threshold)
    cache: str = "none"                       # block KV cache: none, prefix or dual


def validate_tasks(tasks: list, prefix: str = "eval.tasks") -> None:
    """The task specs' own values (their files are checked in the trainer's preflight)."""
    names = set()
    for i, task in enumerate(tasks):
        where = f"{prefix}[{i}]"
        for key in ("name", "path"):
            if not getattr(task, key):
                raise ConfigError(f"{where}.{key} is required (a string)")
        if task.name in names:
            raise ConfigError(f"{where}.name={task.name!r} is used twice; metrics are eval/<name>/acc")
        names.add(task.name)
        for key in ("every", "limit", "mc_num", "batch_size", "gen_length", "steps", "block_length"):
            v = getattr(task, key)
            if v is not None and v < 1:
                raise ConfigError(f"{where}.{key}={v!r} must be an integer >= 1")
        validate_generation_fields(task, where)


def validate_generation_fields(task, where: str) -> None:
    """A generate task's sampler settings follow evaluation/sample.py's SampleConfig.validate
    rules (blocks divide the generation, steps split evenly over blocks), named by field here."""
    if task.answer_regex is not None:
        try:
            re.compile(task.answer_regex)
        except re.error as err:
            raise ConfigError(f"{where}.answer_regex={task.answer_regex!r} is not a valid regular "
                              f"expression: {err}") from None
    if any(not isinstance(s, str) or not s for s in task.stop):
        raise ConfigError(f"{where}.stop={task.stop!r} must be a list of non-empty strings")
    block = task.block_length or task.gen_length
    if task.gen_length % block:
        raise ConfigError(f"{where}.block_length={block} must divide {where}.gen_length={task.gen_length}")
    steps, blocks = task.steps or task.gen_length, task.gen_length // block
    if steps % blocks:
        raise ConfigError(f"{where}.steps={steps} must be a multiple of the number of blocks "
                          f"gen_length/block_length={blocks}")


def typed_tasks(tasks: Sequence, prefix: str = "eval.tasks") -> list:
    """EvalTaskConfig for each spec (dicts are checked like the YAML: errors name the field)."""
    return [t if isinstance(t, EvalTaskConfig) else from_dict(EvalTaskConfig, t, f"{prefix}[{i}].")
            for i, t in enumerate(tasks)]


def check_task_fields(tasks: Sequence, max_seq_len: int, prefix: str = "eval.tasks") -> list:
    """Typed tasks with their own values checked, and room left for a prompt in every generation."""
    tasks = typed_tasks(tasks, prefix)
    validate_tasks(tasks, prefix)
    for i, task in enumerate(tasks):
        if task.mode == "generate" and task.gen_length >= max_seq_len:
            raise ConfigError(f"{prefix}[{i}].gen_length={task.gen_length} must be < "
                              f"model.max_seq_len={max_seq_len} (the prompt needs room too)")
    return tasks
