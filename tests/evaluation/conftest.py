"""Fixtures for the evaluation tools: a stand-in model with hand-set logits, tiny real models, and
two short real training runs (EC and TC) of the real trainer, shared by the tests that need a run
directory."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

from model import DiffusionTransformer, ModelConfig, ModelOutput, from_dict
from tests.trainer.launch import ROOT, tiny_overrides  # noqa: F401 (ROOT: importable from here too)
from trainer.launch import start, trainer_args


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Two cores shared with other jobs: OpenMP spinning across busy cores makes tiny matmuls
    100x slower, and these models are far too small to gain from a second thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(router: str = "expert_choice", vocab: int = 32, max_seq_len: int = 32, capacity: str = "linear_reverse",
                ep_size: int = 1, **arch) -> ModelConfig:
    moe = {"router": router, "num_experts": 4, "expert_hidden": 16, "k": 2, "ep_size": ep_size}
    if router == "expert_choice" and capacity != "static":   # a schedule, so the mask ratio matters
        moe["capacity"] = {"schedule": capacity, "k_min": 1, "k_max": 3}
    return from_dict(ModelConfig, {"model": {"vocab_size": vocab, "d_model": 32, "n_layers": 2, "n_heads": 2,
                                             "max_seq_len": max_seq_len, **arch}, "moe": moe})


def tiny_model(router: str = "expert_choice", seed: int = 0, **kw) -> DiffusionTransformer:
    return DiffusionTransformer(tiny_config(router, **kw), seed=seed).eval()


class FixedLogits(nn.Module):
    """Same forward signature as DiffusionTransformer; returns logits from a fixed [L, V] table
    whatever the input, and records each call's inputs."""

    def __init__(self, table_LV: torch.Tensor, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("table", table_LV.float())
        self.calls = []

    def forward(self, tokens_BL, mask_ratio_B=None, valid_BL=None, logits_mask_BL=None, cache=None):
        # a block cache changes nothing here: the logits of the rows asked for, from the table
        ratio = None if mask_ratio_B is None else mask_ratio_B.clone()
        self.calls.append({"tokens": tokens_BL.clone(), "ratio": ratio})
        B, L = tokens_BL.shape
        logits = self.table[:L].expand(B, L, -1)
        if logits_mask_BL is not None:
            logits = logits[logits_mask_BL]
        return ModelOutput(logits, torch.zeros(()), [])


def start_run(data, run_dir, **extra):
    """The real trainer (DeepSpeed engine, gloo) as one process started by plain python with the
    env:// variables a launcher would set (trainer/launch.py): the deepspeed launcher's own start-up
    costs about 20 s of CPU per run, which the launcher's own tests already pay for. Returns the
    started run (trainer.launch.Launch: poll, wait, communicate -> (output, None), kill, returncode)."""
    over = tiny_overrides(data, run_dir, **{"train.max_steps": 24, "train.eval_every": 4, "train.log_every": 2,
                                            "train.save_every": 1000, **extra})
    return start(1, trainer_args(over), env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="session")
def two_runs(small_corpus, tmp_path_factory):
    """An expert-choice (linear_reverse) and a token-choice run, 24 steps each, launched together."""
    root = tmp_path_factory.mktemp("runs")
    specs = {"ec": {"moe.router": "expert_choice"},
             "tc": {"moe.router": "token_choice", "moe.capacity.schedule": "static"}}
    t0 = time.time()
    procs = {name: start_run(small_corpus, root / name, **extra) for name, extra in specs.items()}
    try:
        for name, p in procs.items():
            out, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                raise AssertionError(f"{name} run failed ({p.returncode}):\n{out[-6000:]}")
    finally:   # a timed-out or failed run must not keep training behind the rest of the suite
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"two training runs in {time.time() - t0:.1f} s")
    return {name: root / name for name in specs}
