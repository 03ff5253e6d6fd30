"""On-the-fly task evaluation during training. The entry point (train.py) builds a TrainingTasks
from the run config and hands its `check` and `evaluate` to the trainer (trainer/hooks.py): the
preflight checks the task files, and the loop calls `evaluate` after every step (a no-op unless a
task is due). The trainer never imports this package.

Tasks are `evaluation.task_config.EvalTaskConfig` (dicts of the same fields are accepted too).
Collective when world > 1: every rank calls it at the same steps (see evaluation/multiple_choice.py
and evaluation/generation_tasks.py).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from model.config import ConfigError
from rundir.tokenizer import data_tokenizer

from .task_config import check_task_fields, typed_tasks

from .generation_tasks import evaluate_generation, load_generation_jsonl, sample_config
from .multiple_choice import evaluate_mc, load_mc_jsonl

_ITEMS_CACHE: dict = {}


def load_items(task) -> list:
    """The task's items, read by the loader of its mode's file format."""
    loader = load_generation_jsonl if task.mode == "generate" else load_mc_jsonl
    return loader(task.path, task.limit)


def check_tasks(tasks: Sequence, prefix: str = "eval.tasks", max_seq_len: Optional[int] = None) -> list:
    """Fail fast, before training starts, on a task that `evaluate_tasks` could not run: its
    fields and its file. The ConfigError names the field (e.g. eval.tasks[1].path)."""
    tasks = check_task_fields(tasks, max_seq_len or float("inf"), prefix)
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


class TrainingTasks:
    """The run's `eval.tasks`, as the trainer receives them from the entry point: `check` in the
    preflight (fields and files), `evaluate` in the loop. Fields are checked at construction, so
    a bad task stops the run before any process group exists."""

    def __init__(self, cfg):
        self.tasks = check_task_fields(cfg.eval.tasks, cfg.model.max_seq_len)
        self.data_path, self.max_seq_len = cfg.data.path, cfg.model.max_seq_len
        self.tokenizer = None   # read on the first evaluation: preflight must not need it

    def check(self, cfg) -> None:
        """Preflight, with the config as resolved there (a mixture's data.path is its first source's)."""
        self.data_path = cfg.data.path
        check_tasks(self.tasks, max_seq_len=self.max_seq_len)

    def evaluate(self, model, step: int, rank: int, world: int) -> dict:
        if self.tokenizer is None:
            self.tokenizer = data_tokenizer(self.data_path)
        return evaluate_tasks(model, self.tasks, self.tokenizer, step, rank, world)
