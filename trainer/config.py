"""The run configuration: the model's config (YAML sections model, moe, diffusion, held as one
ModelConfig) plus train, optim, data, eval and wandb sections. Built from a YAML preset and dotted
`key=value` overrides, resolved once and validated; every error names the key. Batch size, accumulation, precision and clipping live here and only
here: the DeepSpeed JSON says "auto" for them (see ds_config.py).
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml

from model.config import ConfigError, ModelConfig, coerce, from_dict

MODEL_SECTIONS = ("model", "moe", "diffusion")   # YAML sections that make up the ModelConfig


@dataclass
class TrainConfig:
    run_name: str = "tiny"
    output_dir: Optional[str] = None          # default runs/<run_name>: the run directory
    max_steps: int = 200
    schedule_steps: Optional[int] = None      # LR schedule length; default max_steps
    global_batch_size: int = 16
    micro_batch_size: int = 8
    seq_len: int = 128
    eval_every: int = 50
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    seed: int = 1234
    resume: str = "auto"                      # auto | never | <checkpoint dir>
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 on GPU, fp32 on CPU
    grad_clip: float = 1.0
    peak_tflops: Optional[float] = None       # for MFU; None = detect (unknown on CPU -> null)
    # faults (README "Faults and exit statuses")
    nonfinite: Literal["skip", "stop"] = "skip"   # a step with a non-finite loss or gradient
    max_skipped_steps: int = 10               # skip: stop (exit 87) after this many skipped steps in a row
    comm_timeout_s: float = 900.0             # every collective of every process group (a backstop: exit 1)
    setup_timeout_s: float = 900.0            # watchdog: start-up to the first completed step (exit 88)
    hang_timeout_s: float = 600.0             # watchdog: between completed steps and saves; 0: no watchdog
    # pretrain: diffusion over whole sequences; sft: prompts never masked, loss and mask ratio over
    # the response (README "Supervised fine-tuning"); auto: what the prepared data is
    mode: Literal["auto", "pretrain", "sft"] = "auto"
    # every transformer block through torch.compile (trainer/compile.py): auto = on with a GPU,
    # off on CPU, where compiling costs more than it gains (docs/speed.md)
    compile: Literal["auto", True, False] = "auto"


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    eps: float = 1e-8
    warmup_steps: int = 20
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2               # wsd: final fraction of steps spent decaying


@dataclass
class DataConfig:
    path: str = "data/default"                # a directory written by `python -m trainer.data prepare`
    prefetch: int = 2


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


@dataclass
class EvalConfig:
    batches: int = 4                          # validation batches per evaluation
    batch_size: int = 8
    num_ratio_points: int = 10                # fixed grid of mask ratios, one per bin centre
    seed: int = 0
    tasks: list[EvalTaskConfig] = field(default_factory=list)


@dataclass
class InitConfig:
    """Where a new run's weights come from (YAML key `init.from`): None for a fresh initialization,
    or an ecdlm run or checkpoint directory (any layout), or a Hugging Face directory. Weights
    only: the optimizer is fresh and the step is 0. A run that has its own checkpoint resumes from
    that instead (a requeued fine-tuning job must not start over)."""
    source: Optional[str] = None


INIT_KEYS = {"from": "source"}   # YAML name -> field name (`from` is a Python keyword)


@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"   # auto: online iff an API key is set
    project: str = "ecdlm"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list = field(default_factory=list)


@dataclass
class RunConfig:
    model_config: ModelConfig = field(default_factory=ModelConfig)   # YAML: model, moe, diffusion
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def __post_init__(self):
        validate_train(self)

    # the model's sections, read through the one ModelConfig that holds them
    @property
    def model(self):
        return self.model_config.model

    @property
    def moe(self):
        return self.model_config.moe

    @property
    def diffusion(self):
        return self.model_config.diffusion

    def to_dict(self) -> dict:
        """The YAML form: the model's three sections first, then the run's."""
        out = dataclasses.asdict(self.model_config)
        out.update({f.name: dataclasses.asdict(getattr(self, f.name))
                    for f in dataclasses.fields(self) if f.name != "model_config"})
        out["init"] = {yaml_key: out["init"][name] for yaml_key, name in INIT_KEYS.items()}
        return out

    @property
    def run_dir(self) -> str:
        return self.train.output_dir or os.path.join("runs", self.train.run_name)


def run_config_from_dict(tree: dict) -> RunConfig:
    """RunConfig from the YAML tree: the model sections become one (resolved) ModelConfig."""
    if not isinstance(tree, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(tree).__name__}")
    run_fields = {f.name: f for f in dataclasses.fields(RunConfig) if f.name != "model_config"}
    unknown = sorted(set(tree) - set(run_fields) - set(MODEL_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]}; known keys under the top level: "
                          f"{', '.join(sorted((*MODEL_SECTIONS, *run_fields)))}")
    model_config = from_dict(ModelConfig, {k: tree[k] for k in MODEL_SECTIONS if k in tree})
    if isinstance(tree.get("init"), dict):
        init = tree["init"]
        unknown = sorted(set(init) - set(INIT_KEYS))
        if unknown:
            raise ConfigError(f"unknown config key init.{unknown[0]}; known keys under init: {', '.join(INIT_KEYS)}")
        tree = {**tree, "init": {INIT_KEYS[k]: v for k, v in init.items()}}
    hints = typing.get_type_hints(RunConfig)
    sections = {k: coerce(hints[k], v, k) for k, v in tree.items() if k in run_fields}
    return RunConfig(model_config=model_config, **sections)


def resolve_mode(cfg: RunConfig, data_format: str) -> RunConfig:
    """The run with `train.mode` made concrete from the prepared data's format ("pretrain" or
    "sft"), and the model's mask-ratio rule set to match it (what the sampler and the HF export
    read back). A mode that contradicts the data is a ConfigError naming both."""
    mode = cfg.train.mode
    if mode == "auto":
        mode = data_format
    elif mode != data_format:
        how = ("prepare it with `python -m trainer.data prepare --format sft ...`" if mode == "sft"
               else "set train.mode=sft (or auto)")
        raise ConfigError(f"train.mode={mode} but data.path={cfg.data.path} holds {data_format} data; {how}")
    over = "response" if mode == "sft" else "sequence"
    diffusion = dataclasses.replace(cfg.diffusion, mask_ratio_over=over)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mode=mode),
                               model_config=dataclasses.replace(cfg.model_config, diffusion=diffusion))


def validate_train(cfg: RunConfig) -> None:
    t, o = cfg.train, cfg.optim
    for name in ("max_steps", "global_batch_size", "micro_batch_size", "seq_len", "eval_every",
                 "save_every", "keep_last", "log_every"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be >= 1")
    if t.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}")
    if t.schedule_steps is not None and t.schedule_steps < t.max_steps:
        raise ConfigError(f"train.schedule_steps={t.schedule_steps} must be >= train.max_steps={t.max_steps}")
    if not (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas)):
        raise ConfigError(f"optim.betas={o.betas} must be two numbers in [0, 1)")
    if o.lr <= 0 or not 0 <= o.min_lr_ratio <= 1 or o.warmup_steps < 0 or not 0 < o.decay_fraction <= 1:
        raise ConfigError("optim: need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0, 0 < decay_fraction <= 1")
    if t.grad_clip < 0:
        raise ConfigError(f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    if t.max_skipped_steps < 0:
        raise ConfigError(f"train.max_skipped_steps={t.max_skipped_steps} must be >= 0")
    for name in ("comm_timeout_s", "setup_timeout_s"):
        if not getattr(t, name) > 0:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be > 0 seconds")
    if t.hang_timeout_s < 0:
        raise ConfigError(f"train.hang_timeout_s={t.hang_timeout_s} must be >= 0 seconds (0 disables the watchdog)")
    validate_tasks(cfg.eval.tasks)
    for i, task in enumerate(cfg.eval.tasks):   # a generation must leave room for a prompt
        if task.mode == "generate" and task.gen_length >= cfg.model.max_seq_len:
            raise ConfigError(f"eval.tasks[{i}].gen_length={task.gen_length} must be < "
                              f"model.max_seq_len={cfg.model.max_seq_len} (the prompt needs room too)")
    if cfg.init.source is not None and not (isinstance(cfg.init.source, str) and cfg.init.source):
        raise ConfigError(f"init.from={cfg.init.source!r} must be a path (a run, checkpoint or Hugging Face directory)")


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


# ---- YAML + overrides --------------------------------------------------------------------------
def parse_override(item: str) -> tuple[list, object]:
    """'moe.capacity.k_max=32' -> (['moe', 'capacity', 'k_max'], 32); values parse as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.max_steps=50)")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    return key.split("."), parse_value(raw)


def parse_value(raw: str):
    """YAML, except that a decimal number is a number: YAML 1.1 reads `3e-4` and `1e8` (no dot,
    or an unsigned exponent) as strings. Everything else keeps its YAML meaning (true, null,
    .inf, [1, 2]; other words stay strings)."""
    if raw == "":
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and _NUMBER.fullmatch(raw.strip()):
        return float(raw)
    return value


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def apply_override(tree: dict, path: list, value) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def load_config(path: Optional[str] = None, overrides: tuple = ()) -> RunConfig:
    """Preset YAML (or the defaults) + dotted overrides -> validated RunConfig."""
    tree: dict = {}
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} does not exist (presets are in configs/)")
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    for item in overrides:
        apply_override(tree, *parse_override(item))
    return run_config_from_dict(tree)


def save_config(cfg: RunConfig, path: str) -> None:
    data = cfg.to_dict()
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    os.replace(tmp, path)
