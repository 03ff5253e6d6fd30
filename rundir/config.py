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
    # faults (docs/operations.md "Faults and exit statuses")
    nonfinite: Literal["skip", "stop"] = "skip"   # a step with a non-finite loss or gradient
    max_skipped_steps: int = 10               # skip: stop (exit 87) after this many skipped steps in a row
    comm_timeout_s: float = 900.0             # every collective of every process group (a backstop: exit 1)
    setup_timeout_s: float = 900.0            # watchdog: start-up to the first completed step (exit 88)
    hang_timeout_s: float = 600.0             # watchdog: between completed steps and saves; 0: no watchdog
    # pretrain: diffusion over whole sequences; sft: prompts never masked, loss and mask ratio over
    # the response (docs/huggingface.md "Retrofit and supervised fine-tuning"); auto: what the prepared data is
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
class MixtureEntry:
    """One source of a data mixture (docs/data.md): a prepared directory and its share of every batch."""
    path: str = ""
    weight: float = 0.0                       # > 0; weights that do not sum to 1 are normalized
    name: Optional[str] = None                # metric suffix (train/loss/<name>); default the directory's name


@dataclass
class DataConfig:
    path: str = "data/default"                # a directory written by `python -m trainer.data prepare`
    prefetch: int = 2
    # several prepared directories blended by weight (trainer/data/mixture.py); when given, data.path
    # is set to the first source's (the tokenizer's home, which every source shares)
    mixture: list[MixtureEntry] = field(default_factory=list)


@dataclass
class EvalConfig:
    batches: int = 4                          # validation batches per evaluation
    batch_size: int = 8
    num_ratio_points: int = 10                # fixed grid of mask ratios, one per bin centre
    seed: int = 0
    # on-the-fly tasks, each a mapping of evaluation/task_config.py's EvalTaskConfig fields: evaluation
    # owns their meaning and checks (the entry point hands them to the loop; docs/operations.md "On-the-fly tasks")
    tasks: list[dict] = field(default_factory=list)


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
    validate_mixture(cfg.data.mixture)
    if cfg.init.source is not None and not (isinstance(cfg.init.source, str) and cfg.init.source):
        raise ConfigError(f"init.from={cfg.init.source!r} must be a path (a run, checkpoint or Hugging Face directory)")


def mixture_name(entry: MixtureEntry) -> str:
    return entry.name or os.path.basename(os.path.normpath(entry.path))


def validate_mixture(entries: list) -> None:
    """The mixture's own values (its directories are checked in the trainer's preflight)."""
    names = {}
    for i, entry in enumerate(entries):
        where = f"data.mixture[{i}]"
        if not entry.path:
            raise ConfigError(f"{where}.path is required (a directory written by `python -m trainer.data prepare`)")
        if not entry.weight > 0:
            raise ConfigError(f"{where}.weight={entry.weight!r} (source {mixture_name(entry)}) must be > 0; "
                              f"drop the source to leave it out")
        name = mixture_name(entry)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"{where}.name={name!r} must be letters, digits, '_', '.' or '-' "
                              f"(it names metrics train/loss/<name>); set {where}.name")
        if name in names:
            raise ConfigError(f"{where} and data.mixture[{names[name]}] are both named {name!r}; "
                              f"set a distinct name for one of them")
        names[name] = i


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


def merge_tree(base: dict, over: dict) -> dict:
    """`over` laid on `base`: sections merge key by key, anything else (a list too) is replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge_tree(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path=None, overrides: tuple = ()) -> RunConfig:
    """Preset YAML file(s) (or the defaults) + dotted overrides -> validated RunConfig. `path` may
    be a list of files: later ones override earlier ones, section by section."""
    tree: dict = {}
    for one in ([path] if isinstance(path, str) else path or []):
        if not os.path.exists(one):
            raise ConfigError(f"config file {one} does not exist (presets are in configs/)")
        with open(one) as f:
            try:
                layer = yaml.safe_load(f)
            except yaml.YAMLError as err:   # the parser's message has the line and column
                raise ConfigError(f"config file {one} is not valid YAML: {' '.join(str(err).split())}") from None
        if layer is None:
            raise ConfigError(f"config file {one} is empty: it would train the built-in default model, which is "
                              f"not what an empty file says; give a preset from configs/ (e.g. configs/tiny.yaml)")
        if not isinstance(layer, dict):
            raise ConfigError(f"config file {one} must hold a mapping of sections")
        tree = merge_tree(tree, layer)
    for item in overrides:
        apply_override(tree, *parse_override(item))
    return run_config_from_dict(tree)


def save_config(cfg: RunConfig, path: str) -> None:
    from rundir.checkpoint_store import atomic_file   # exclusive temporary, atomic replace
    with atomic_file(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
