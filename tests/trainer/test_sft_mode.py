"""train.mode and init.from in the run config (issue 12): the mode follows the prepared data, sets
the model's mask-ratio rule, and contradictions are refused before any process group exists."""
from __future__ import annotations

import pytest
import yaml

from model import ConfigError
from tests.trainer.test_cli import run_main
from rundir.config import load_config, resolve_mode


def test_auto_mode_follows_the_data_and_sets_the_rule():
    cfg = load_config("configs/tiny.yaml")
    assert cfg.train.mode == "auto" and cfg.diffusion.mask_ratio_over == "sequence"
    sft = resolve_mode(cfg, "sft")
    assert sft.train.mode == "sft" and sft.diffusion.mask_ratio_over == "response"
    assert sft.model_config.capacity.expected_k() == cfg.model_config.capacity.expected_k()
    pre = resolve_mode(cfg, "pretrain")
    assert pre.train.mode == "pretrain" and pre.diffusion.mask_ratio_over == "sequence"


@pytest.mark.parametrize("mode, data, message", [
    ("sft", "pretrain", "holds pretrain data; prepare it with `python -m trainer.data prepare --format sft"),
    ("pretrain", "sft", "holds sft data; set train.mode=sft (or auto)"),
])
def test_a_mode_that_contradicts_the_data_is_refused(mode, data, message):
    cfg = load_config("configs/tiny.yaml", (f"train.mode={mode}",))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_mode(cfg, data)


def test_init_from_round_trips_through_the_saved_yaml(tmp_path):
    cfg = load_config("configs/tiny.yaml", ("init.from=runs/tc",))
    assert cfg.init.source == "runs/tc" and cfg.to_dict()["init"] == {"from": "runs/tc"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(str(path)).init.source == "runs/tc"
    with pytest.raises(ConfigError, match="unknown config key init.path; known keys under init: from"):
        load_config("configs/tiny.yaml", ("init.path=x",))


def test_the_trainer_refuses_before_starting(small_corpus, tmp_path):
    ok = [f"data.path={small_corpus}", "model.vocab_size=1024", f"train.output_dir={tmp_path / 'run'}"]
    proc = run_main("--config", "configs/tiny.yaml", *ok, "train.mode=sft")
    assert proc.returncode == 2 and "train.mode=sft but data.path=" in proc.stderr, proc.stderr[-2000:]
    proc = run_main("--config", "configs/tiny.yaml", *ok, f"init.from={tmp_path / 'missing'}")
    assert proc.returncode == 2 and "is not a directory (expected an ecdlm run or checkpoint" in proc.stderr, \
        proc.stderr[-2000:]
    (tmp_path / "empty").mkdir()
    proc = run_main("--config", "configs/tiny.yaml", *ok, f"init.from={tmp_path / 'empty'}")
    assert proc.returncode == 2 and "an empty directory, not a run" in proc.stderr, proc.stderr[-2000:]


def test_the_retrofit_preset_fits_llada_moe_weights_at_static_and_dynamic_capacity():
    import torch
    from model import DiffusionTransformer
    tc = load_config("configs/llada_moe_7b.yaml")
    for over in ((), ("moe.capacity.schedule=linear_reverse", "moe.capacity.k_min=2", "moe.capacity.k_max=14")):
        ec = load_config("configs/retrofit_llada_moe.yaml", over)
        assert ec.moe.router == "expert_choice" and ec.train.mode == "sft" and ec.init.source
        assert abs(ec.model_config.capacity.expected_k() - 8) < 0.08   # FLOP-matched to TC's top-8
    with torch.device("meta"):   # shapes only: 7B parameters are never allocated
        shapes = [{n: t.shape for n, t in DiffusionTransformer(c.model_config).state_dict().items()}
                  for c in (tc, ec)]
    assert shapes[0] == shapes[1]   # every tensor of an imported LLaDA-MoE loads by init.from


def test_a_generation_longer_than_the_model_is_refused_in_the_config():
    """Checked where train.py builds the in-training tasks, before anything else starts."""
    from evaluation.tasks import TrainingTasks
    cfg = load_config("configs/tiny.yaml", ("eval.tasks=[{name: g, path: x, mode: generate, gen_length: 128}]",))
    with pytest.raises(ConfigError, match=r"eval.tasks\[0\].gen_length=128 must be < model.max_seq_len=128"):
        TrainingTasks(cfg)
