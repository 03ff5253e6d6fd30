"""`init.from` (issue 12): a new run starts from another run's weights. A real token-choice run is
retrofitted to expert choice: in process (every tensor but the TC biases equal, expert rows split
over a real 2-rank gloo group) and through the real launcher (2 processes, expert-parallel)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rundir.state import checkpoint_and_config, full_model_state
from model import DiffusionTransformer
from model.config import ConfigError
from tests.distributed import run_distributed
from tests.evaluation.conftest import start_run
from tests.conftest import TC_BIAS   # the tc_run fixture (tests/conftest.py) is a run with these
from tests.trainer.launch import launch, per_step, tiny_overrides
from rundir.config import load_config
from trainer.init_weights import load_initial_weights

def target_config(small_corpus, tmp_path, **extra):
    over = tiny_overrides(small_corpus, tmp_path / "new", **{"moe.router": "expert_choice", **extra})
    return load_config("configs/tiny.yaml", tuple(over))


def test_tc_to_ec_keeps_every_tensor_but_the_tc_biases(tc_run, small_corpus, tmp_path):
    ckpt, _ = checkpoint_and_config(str(tc_run))
    source = full_model_state(ckpt)
    biases = [n for n in source if n.endswith("expert_bias")]
    assert biases and all(source[n].abs().max() > 0 for n in biases), "the TC run must have learned biases"
    cfg = target_config(small_corpus, tmp_path)
    model = DiffusionTransformer(cfg.model_config, seed=99)
    report = load_initial_weights(model, cfg, str(tc_run))
    assert report["dropped"] == sorted(biases) and report["source_router"] == "token_choice"
    state = model.state_dict()
    assert set(state) == set(source)
    for name, tensor in state.items():
        if name in biases:
            assert torch.count_nonzero(tensor) == 0, name   # EC: the configured model's zeros
        else:
            assert torch.equal(tensor, source[name]), name   # W_r included: the same router weights


def test_tc_to_tc_keeps_the_biases(tc_run, small_corpus, tmp_path):
    cfg = target_config(small_corpus, tmp_path, **TC_BIAS)
    model = DiffusionTransformer(cfg.model_config, seed=99)
    assert load_initial_weights(model, cfg, str(tc_run))["dropped"] == []
    source = full_model_state(checkpoint_and_config(str(tc_run))[0])
    assert all(torch.equal(t, source[n]) for n, t in model.state_dict().items())


def test_every_misfit_is_named_with_both_shapes(tc_run, small_corpus, tmp_path):
    cfg = target_config(small_corpus, tmp_path, **{"moe.expert_hidden": 32, "moe.num_experts": 8})
    model = DiffusionTransformer(cfg.model_config)
    with pytest.raises(ConfigError) as err:
        load_initial_weights(model, cfg, str(tc_run))
    msg = str(err.value)
    assert "blocks.0.ffn.experts.w_in_EDF: source shape [16, 128, 128], configured [8, 128, 64]" in msg
    assert "blocks.0.ffn.router.weight: source shape [16, 128], configured [8, 128]" in msg
    assert "blocks.3.ffn.experts.w_out_EHD" in msg   # all of them, not just the first


def test_a_changed_mask_id_is_refused(tc_run, small_corpus, tmp_path):
    cfg = target_config(small_corpus, tmp_path, **{"model.mask_id": 5})
    with pytest.raises(ConfigError, match=r"model.mask_id is 3 there, 5 here"):
        load_initial_weights(DiffusionTransformer(cfg.model_config), cfg, str(tc_run))


def _load_on_expert_parallel_rank(rank, world, overrides, path):
    cfg = load_config("configs/tiny.yaml", overrides)   # configs hold lambdas: rebuilt, not pickled
    model = DiffusionTransformer(cfg.model_config, dist.new_group(list(range(world))), seed=rank)
    load_initial_weights(model, cfg, path)
    return {n: t.clone() for n, t in model.state_dict().items()}


def test_expert_parallel_ranks_take_their_own_rows(tc_run, small_corpus, tmp_path):
    over = tuple(tiny_overrides(small_corpus, tmp_path / "new", **{"moe.router": "expert_choice", "moe.ep_size": 2}))
    source = full_model_state(checkpoint_and_config(str(tc_run))[0])
    per_rank = run_distributed(_load_on_expert_parallel_rank, 2, over, str(tc_run))
    name = "blocks.1.ffn.experts.w_out_EHD"
    assert per_rank[0][name].shape[0] == 8
    for rank, state in enumerate(per_rank):
        assert torch.equal(state[name], source[name][8 * rank:8 * (rank + 1)])
        assert torch.equal(state["blocks.1.ffn.router.weight"], source["blocks.1.ffn.router.weight"])


def test_a_launched_retrofit_starts_from_the_tc_weights(tc_run, small_corpus, tmp_path):
    """2 processes, experts split over both: the logged start, and a step-0 validation loss at the
    TC run's trained level rather than at a fresh model's."""
    run_dir = tmp_path / "retrofit"
    proc = launch(2, tiny_overrides(small_corpus, run_dir, **{
        "init.from": str(tc_run), "moe.router": "expert_choice", "moe.ep_size": 2, "train.max_steps": 2,
        "train.eval_every": 2, "optim.warmup_steps": 1}))
    text = proc.stdout + proc.stderr
    assert "tensors loaded (source router token_choice, configured expert_choice)" in text, text[-4000:]
    assert "dropped the token-choice expert biases of 4 layers" in text
    fresh, trained = per_step(tc_run, "val/loss")[0], min(per_step(tc_run, "val/loss").values())
    start = per_step(run_dir, "val/loss")[0]
    assert abs(start - trained) < 0.5 * (fresh - trained), (fresh, trained, start)
    # requeued (here on one process): the run's own checkpoint wins over init.from
    again = start_run(small_corpus, run_dir, **{"init.from": str(tc_run), "moe.router": "expert_choice",
                                                "train.max_steps": 3})
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "not used: resuming from the run's own checkpoint" in out, out[-4000:]
