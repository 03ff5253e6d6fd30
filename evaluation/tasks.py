"""On-the-fly task evaluation during training: the trainer's preflight checks the task files, and
the loop calls `evaluate_tasks` after every step (a no-op unless a task is due).

Tasks are `trainer.config.EvalTaskConfig` (dicts of the same fields are accepted too). Collective
when world > 1: every rank calls it at the same steps (see evaluation/multiple_choice.py and
evaluation/generation_tasks.py).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from model.config import ConfigError, from_dict
from trainer.config import EvalTaskConfig, validate_tasks

from .generation_tasks import evaluate_generation, load_generation_jsonl, sample_config
from .multiple_choice import evaluate_mc, load_mc_jsonl

_ITEMS_CACHE: dict = {}


def load_items(task) -> list:
    """The task's items, read by the loader of its mode's file format."""
    loader = load_generation_jsonl if task.mode == "generate" else load_mc_jsonl
    return loader(task.path, task.limit)


def typed_tasks(tasks: Sequence, prefix: str = "eval.tasks") -> list:
    """EvalTaskConfig for each spec (dicts are checked like the YAML: errors name the field)."""
    return [t if isinstance(t, EvalTaskConfig) else from_dict(EvalTaskConfig, t, f"{prefix}[{i}].")
            for i, t in enumerate(tasks)]


def check_tasks(tasks: Sequence, prefix: str = "eval.tasks") -> list:
    """Fail fast, before training starts, on a task that `evaluate_tasks` could not run: its
    fields and its file. The ConfigError names the field (e.g. eval.tasks[1].path)."""
    tasks = typed_tasks(tasks, prefix)
    validate_tasks(tasks, prefix)
    for i, task in enumerate(tasks):
        where = f"{prefix}[{i}]"
        if not os.path.exists(task.path):
            raise ConfigError(f"{where}.path={task.path} does not exist")
        try:
            load_items(task)
            if task.mode == "generate":
                sample_config(task).validate()   # the sampler's own rules, should they outgrow validate_tasks
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
    return tasks


def evaluate_tasks(model, tasks: Sequence, tokenizer, step: int, rank: Optional[int] = None,
                   world: Optional[int] = None) -> dict:
    """Metrics {"eval/<name>/acc": ...} (multiple choice) or {"eval/<name>/exact_match": ...}
    (generate) of the tasks due at `step` (step % every == 0)."""
    row = {}
    for task in typed_tasks(tasks):
        if step % task.every:
            continue
        key = (task.path, task.limit, task.mode == "generate")
        if key not in _ITEMS_CACHE:
            _ITEMS_CACHE[key] = load_items(task)
        if task.mode == "generate":
            res = evaluate_generation(model, tokenizer, _ITEMS_CACHE[key], task, rank, world)
            row[f"eval/{task.name}/exact_match"] = res["exact_match"]
            continue
        res = evaluate_mc(model, tokenizer, _ITEMS_CACHE[key], task.mode, task.mc_num, task.batch_size,
                          task.seed, rank, world)
        for metric in ("acc", "acc_norm"):
            if metric in res:
                row[f"eval/{task.name}/{metric}"] = res[metric]
    return row
