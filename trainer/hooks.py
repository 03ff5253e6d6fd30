"""What the entry point (train.py) hands a training run, so that trainer/ never imports
evaluation/ (as OLMo-core's trainer takes callbacks): the in-training evaluation and the reader of
Hugging Face directories for `init.from`. Each defaults to "none", so a run built without them
trains and refuses only what needs them, by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class RunHooks:
    # preflight, before anything expensive: raises ConfigError naming the bad field or file
    check: Callable[[object], None] = lambda cfg: None
    # after every step, on every rank (collective): (model, step, rank, world) -> metrics row, {} if none due
    evaluate: Optional[Callable[[object, int, int, int], dict]] = None
    # init.from of a Hugging Face directory: (path, fallback_mask_id=None) -> (ModelConfig, {name: tensor}
    # in ecdlm's naming); fallback_mask_id: the configured mask of a source whose tokenizer names none
    read_hf_dir: Optional[Callable[[str], tuple]] = None
    # its preflight, reading config.json only: path -> anything; raises ConfigError
    check_hf_dir: Optional[Callable[[str], object]] = None
