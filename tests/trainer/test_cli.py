"""The entry point's configuration handling: overrides, presets, clear errors before any
expensive work, and launching through mpiexec (DeepSpeed's MPI discovery)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.launch import BIN, ROOT, per_step, run_killing_group, tiny_overrides
from trainer.launch import ENTRY
from rundir.config import load_config
from model import ConfigError


def run_main(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, ENTRY, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_overrides_reach_every_section():
    cfg = load_config("configs/tiny.yaml", ("moe.router=token_choice", "train.max_steps=50",
                                            "moe.capacity_factor=1.25", "optim.betas=[0.8, 0.9]", "wandb.tags=[a]"))
    assert cfg.moe.router == "token_choice" and cfg.train.max_steps == 50
    assert cfg.moe.capacity_factor == 1.25 and cfg.optim.betas == [0.8, 0.9] and cfg.wandb.tags == ["a"]
    assert cfg.run_dir == os.path.join("runs", "tiny")


@pytest.mark.parametrize("preset", ["tiny", "owt_ec", "owt_tc", "ec_8b_a1b"])
def test_presets_validate(preset):
    cfg = load_config(f"configs/{preset}.yaml")
    counts = cfg.model_config.param_counts()
    assert counts["active"] < counts["total"]
    if preset == "owt_ec":
        assert (cfg.model.n_layers, cfg.model.d_model, cfg.moe.num_experts, cfg.moe.expert_hidden) == (16, 512, 512, 384)
        assert cfg.moe.capacity.schedule == "linear_reverse" and cfg.train.global_batch_size == 256
    if preset == "ec_8b_a1b":
        assert 7.5e9 < counts["total"] < 9e9 and counts["active"] < 2e9


@pytest.mark.parametrize("args, message", [
    (["train.max_step=5"], "unknown config key train.max_step"),
    (["train.max_steps=abc"], "train.max_steps='abc' must be an integer"),
    (["moe.router=topk"], "moe.router='topk' must be one of"),
    (["moe.capacity.k_max=80"], "moe.capacity.k_max=80 exceeds moe.num_experts=16"),
    (["moe.capacity.k_max=4"], "expected k=2.500"),
    (["train.global_batch_size=20"], "train.global_batch_size=20 must be a multiple of train.micro_batch_size=16"),
    (["data.path=/nonexistent"], "run `python -m trainer.data prepare"),
    (["noequals"], "must look like key=value"),
])
def test_bad_config_is_refused_with_the_key_named(args, message):
    proc = run_main("--config", "configs/tiny.yaml", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_layout_errors_name_both_numbers(small_corpus):
    ok = [f"data.path={small_corpus}", "model.vocab_size=1024"]
    proc = run_main("--config", "configs/tiny.yaml", *ok, "moe.ep_size=4", env={"WORLD_SIZE": "2"})
    assert proc.returncode == 2 and "moe.ep_size=4 must divide the world size 2" in proc.stderr, proc.stderr
    proc = run_main("--config", "configs/tiny.yaml", *ok, "train.global_batch_size=48", env={"WORLD_SIZE": "2"})
    assert proc.returncode == 2 and "not divisible by train.micro_batch_size=16 x data-parallel size 2" in proc.stderr
    proc = run_main("--config", "configs/tiny.yaml", f"data.path={small_corpus}")
    assert proc.returncode == 2 and "vocab_size=1024" in proc.stderr and "model.vocab_size=4096" in proc.stderr


def test_ds_json_contradicting_yaml_and_zero3_with_moe(small_corpus, tmp_path):
    ok = [f"data.path={small_corpus}", "model.vocab_size=1024"]
    bad = json.load(open(ROOT / "ds_configs/zero2.json"))
    bad["train_micro_batch_size_per_gpu"] = 4
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    proc = run_main("--ds_config", str(path), "--config", "configs/tiny.yaml", *ok)
    assert proc.returncode == 2
    assert "train_micro_batch_size_per_gpu=4 contradicts train.micro_batch_size=16" in proc.stderr, proc.stderr
    zero3 = json.load(open(ROOT / "ds_configs/zero2.json"))
    zero3["zero_optimization"] = {"stage": 3}
    path.write_text(json.dumps(zero3))
    proc = run_main("--ds_config", str(path), "--config", "configs/tiny.yaml", *ok)
    assert proc.returncode == 2 and "ZeRO stage 3" in proc.stderr and "zero2.json" in proc.stderr


def test_resolved_config_is_saved_and_reloads(small_corpus, tmp_path):
    """mpiexec launch (MPI discovery through mpi4py), and the run directory's resolved configs."""
    run_dir = tmp_path / "mpi"
    proc = run_killing_group([str(BIN / "mpiexec"), "-n", "2", sys.executable, ENTRY, "--config",
                              "configs/tiny.yaml", *tiny_overrides(small_corpus, run_dir, **{
                                  "train.max_steps": 2, "train.eval_every": 100, "train.save_every": 100})],
                             timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(per_step(run_dir, "train/loss")) == [1, 2]
    ds = json.load(open(run_dir / "ds_config.json"))
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 1   # 16 / (8 x 2)
    reloaded = load_config(str(run_dir / "config.yaml"))
    assert reloaded.train.max_steps == 2 and reloaded.data.path == str(small_corpus)
