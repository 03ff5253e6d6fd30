"""Checkpoints that travel: a run written at one world size, expert-parallel size, ZeRO stage and
micro-batch size continues at another, exactly (the real trainer, as plain env:// ranks)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.launch import ROOT, launch, per_step, tiny_overrides
from trainer.launch import ENTRY
from rundir.checkpoint_store import EXP_AVG, EXP_AVG_SQ, MASTER, WEIGHTS, FragmentReader
from rundir.checkpoints import read_state

HALF, FULL = 6, 12
# the LR schedule spans all 12 steps in every run, so the halves continue one curve
COMMON = {"train.schedule_steps": FULL, "train.eval_every": 100, "train.save_every": 100}
TC = {"moe.router": "token_choice", "moe.bias_update_rate": 0.01, "moe.capacity_factor": 1.0}


def layout(nproc, ep, zero, micro):
    return {"nproc": nproc, "ds": f"ds_configs/zero{zero}.json",
            "extra": {"moe.ep_size": ep, "train.micro_batch_size": micro}}


def run(corpus, run_dir, steps, lay, extra=(), **kw):
    overrides = tiny_overrides(corpus, run_dir, **{**COMMON, "train.max_steps": steps, **lay["extra"], **dict(extra)})
    return launch(lay["nproc"], overrides, ds_config=lay["ds"], **kw)


EP2 = layout(2, 2, 2, 8)       # 2 processes, experts split in two, ZeRO-2
ONE = layout(1, 1, 2, 8)       # 1 process (2 micro-batches per step)
EP1_Z1 = layout(2, 1, 1, 4)    # 2 processes, experts replicated, ZeRO-1, smaller micro-batches
ONE_Z1 = layout(1, 1, 1, 16)


@pytest.fixture(scope="module")
def base(small_corpus, tmp_path_factory):
    """Straight 12-step runs and 6-step first halves, EC and TC."""
    root = tmp_path_factory.mktemp("reshard")
    out = {"root": root, "corpus": small_corpus}
    for name, steps, lay, extra in (("ec_straight", FULL, EP2, {}), ("ec_half", HALF, EP2, {}),
                                    ("ec_half_one", HALF, ONE_Z1, {}),
                                    ("tc_straight", FULL, EP2, TC), ("tc_half", HALF, EP2, TC)):
        run(small_corpus, root / name, steps, lay, extra)
        out[name] = root / name
    return out


def continue_from(base, half: str, name: str, lay, extra=()):
    """A copy of the first half's run directory, continued to step 12 at layout `lay`."""
    run_dir = base["root"] / name
    shutil.copytree(base[half], run_dir)
    proc = run(base["corpus"], run_dir, FULL, lay, extra)
    return run_dir, proc.stdout + proc.stderr


def assert_same_trajectory(a_dir, b_dir):
    a, b = per_step(a_dir, "train/loss"), per_step(b_dir, "train/loss")
    assert sorted(a) == sorted(b) == list(range(1, FULL + 1))
    for step in a:   # 1e-4: the tolerance of layout independence itself
        assert b[step] == pytest.approx(a[step], rel=1e-4), f"step {step}: {b[step]} vs {a[step]}"
    lr_a, lr_b = per_step(a_dir, "train/lr"), per_step(b_dir, "train/lr")
    assert all(lr_b[s] == pytest.approx(lr_a[s], rel=1e-9) for s in lr_a)


@pytest.mark.parametrize("half, lay, extra, what", [
    ("ec_half", ONE, {}, "2 processes ep=2 -> 1 process"),
    ("ec_half_one", EP2, {}, "1 process ZeRO-1 -> 2 processes ep=2 ZeRO-2"),
    ("ec_half", EP1_Z1, {}, "ep=2 ZeRO-2 micro 8 -> ep=1 ZeRO-1 micro 4"),
    ("tc_half", ONE, TC, "TC with the aux-loss-free bias, 2 processes ep=2 -> 1 process"),
])
def test_continues_the_same_trajectory_at_another_layout(base, half, lay, extra, what):
    name = f"{half}_to_{lay['nproc']}p_ep{lay['extra']['moe.ep_size']}_{os.path.basename(lay['ds'])[:5]}"
    run_dir, log = continue_from(base, half, name, lay, extra)
    assert "resharding checkpoint: written at" in log, what
    assert_same_trajectory(base["tc_straight" if half.startswith("tc") else "ec_straight"], run_dir)


def probe(base, src: str, lay, name: str):
    """Load `src`'s newest checkpoint at layout `lay` and save it again, untouched."""
    run_dir = base["root"] / name
    shutil.copytree(base[src], run_dir)
    out = base["root"] / (name + "_out")
    extra = TC if src.startswith("tc") else {}
    overrides = tiny_overrides(base["corpus"], run_dir, **{**COMMON, "train.max_steps": FULL, **lay["extra"], **extra})
    launch(lay["nproc"], overrides, ds_config=lay["ds"], script="tests/trainer/reshard_probe.py",
           env={"PROBE_OUT": str(out)})
    return run_dir / "checkpoints" / f"step_{HALF:08d}", out / "checkpoints" / f"step_{HALF:08d}"


@pytest.mark.parametrize("src, lay", [("ec_half", ONE_Z1), ("ec_half_one", EP2), ("tc_half", EP1_Z1)])
def test_state_transfer_is_bit_exact(base, src, lay):
    """Weights, master weights and both Adam moments of every tensor, expert and not, come back
    bit for bit after a load at another layout (gathered through a save at that layout)."""
    before, after = probe(base, src, lay, f"probe_{src}_{lay['nproc']}p_ep{lay['extra']['moe.ep_size']}")
    a, b = FragmentReader(str(before)), FragmentReader(str(after))
    assert a.names(WEIGHTS) == b.names(WEIGHTS)
    experts = [n for n in a.names(WEIGHTS) if ".experts." in n]
    assert experts and len(experts) < len(a.names(WEIGHTS))
    for name in a.names(WEIGHTS):
        for kind in (WEIGHTS, MASTER, EXP_AVG, EXP_AVG_SQ):
            assert a.has(name, kind) == b.has(name, kind), (name, kind)
            if a.has(name, kind):
                assert torch.equal(a.full(name, kind), b.full(name, kind)), (name, kind)
    moments = [n for n in a.names(EXP_AVG)]
    assert len(moments) == len([n for n in a.names(WEIGHTS) if not n.endswith("expert_bias")])
    sa, sb = read_state(str(before)), read_state(str(after))
    assert sa["adam_step"] == sb["adam_step"] == HALF
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"]
    assert sa["loader"] == sb["loader"]


def test_zero_to_fp32_in_the_folder_consolidates_an_ep2_checkpoint(base, tmp_path):
    ckpt = base["ec_half"] / "checkpoints" / f"step_{HALF:08d}"
    script = base["ec_half"] / "checkpoints" / "zero_to_fp32.py"
    out = tmp_path / "model_fp32.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), str(ckpt), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    state = load_file(str(out))
    from rundir.state import full_model_state
    ref = full_model_state(str(ckpt))
    assert sorted(state) == sorted(ref)
    assert all(torch.equal(state[k], ref[k].float()) and state[k].dtype == torch.float32 for k in ref)
    w_in = [k for k in state if k.endswith("experts.w_in_EDF")]
    assert w_in and all(state[k].shape[0] == 16 for k in w_in)   # both ranks' 8 experts, once each


@pytest.mark.parametrize("override, field", [
    ("model.d_model=256", "model.d_model was 128 there, 256 now"),
    ("moe.num_experts=8", "moe.num_experts was 16 there, 8 now"),
    ("moe.router=token_choice", "moe.router was 'expert_choice' there, 'token_choice' now"),
    ("train.global_batch_size=32", "train.global_batch_size was 16 there, 32 now"),
])
def test_what_cannot_carry_over_is_refused_before_training(base, tmp_path, override, field):
    run_dir = tmp_path / "run"
    shutil.copytree(base["ec_half"], run_dir)
    args = tiny_overrides(base["corpus"], run_dir, **{**COMMON, "train.max_steps": FULL}) + [override]
    proc = subprocess.run([sys.executable, ENTRY, "--config", "configs/tiny.yaml", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    first = proc.stderr.strip().splitlines()[-1]
    assert first.startswith("error: cannot resume from") and field in first, first
