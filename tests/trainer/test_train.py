"""The real trainer, 1 or 2 processes on gloo (no mocks): one layout run through the real `deepspeed`
launcher (the command a user types), the others as plain env:// ranks (tests/trainer/launch.py)."""
import glob
import json
import os

import pytest
import torch

from tests.trainer.launch import launch, per_step, read_metrics, tiny_overrides


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory):
    """Three short runs of the tiny EC preset on the same global batches: 1 process (ep=1) and
    2 processes with ep=2 (through the `deepspeed` launcher), 10 steps each; plus the 2-process
    ep=2 run under ZeRO-1."""
    base = tmp_path_factory.mktemp("runs")
    task = base / "toy_task.jsonl"   # on-the-fly multiple choice, evaluated under ep=2 too
    task.write_text("\n".join(json.dumps({"question": f"def f{i}(x): return", "choices": ["x", "y", "(", ")"],
                                          "answer": i % 4}) for i in range(6)) + "\n")
    tasks = f"[{{name: toy, path: {task}, mode: single_mask, every: 5}}]"
    out = {"shm_before": _deepspeed_shm_segments(), "logs": []}
    for name, nproc, ds, launcher, extra in (("single", 1, "zero2", "env", {}),
                                             ("ep2", 2, "zero2", "deepspeed", {"moe.ep_size": 2, "wandb.mode": "offline",
                                                                              "eval.tasks": tasks}),
                                             ("ep2_zero1", 2, "zero1", "env", {"moe.ep_size": 2})):
        run_dir = base / name
        proc = launch(nproc, tiny_overrides(small_corpus, run_dir, **{"train.max_steps": 10, "train.save_every": 5,
                                                               "train.eval_every": 5, **extra}),
               ds_config=f"ds_configs/{ds}.json", launcher=launcher,
               env={"OMP_NUM_THREADS": None} if name == "ep2" else None)   # the trainer's own share
        out[name] = run_dir
        out["logs"].append(proc.stdout + proc.stderr)
    out["shm_after"] = _deepspeed_shm_segments()
    return out


def _deepspeed_shm_segments() -> set:
    return set(glob.glob("/dev/shm/deepspeed_*"))


def _close(a: dict, b: dict, rel: float, what: str):
    assert sorted(a) == sorted(b) and len(a) >= 10, f"{what}: steps differ {sorted(a)} vs {sorted(b)}"
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=rel), f"{what} at step {step}: {a[step]} vs {b[step]}"


def test_losses_do_not_depend_on_layout(runs):
    """1 process holding every expert vs 2 processes with expert parallelism over both."""
    single = per_step(runs["single"], "train/loss")
    _close(single, per_step(runs["ep2"], "train/loss"), 1e-4, "ep=2 vs 1 process")
    _close(single, per_step(runs["ep2_zero1"], "train/loss"), 1e-4, "ep=2 ZeRO-1 vs 1 process")


def test_grad_norm_counts_every_parameter_once(runs):
    """The clipping norm under expert parallelism equals the single-process norm (first step:
    same weights, same global batch)."""
    single = per_step(runs["single"], "train/grad_norm")
    for name in ("ep2", "ep2_zero1"):
        other = per_step(runs[name], "train/grad_norm")
        assert other[1] == pytest.approx(single[1], rel=1e-5), name
        for step in single:   # later steps drift only by float rounding through the weights
            assert other[step] == pytest.approx(single[step], rel=1e-3), (name, step)


def test_checkpoint_holds_every_expert_exactly_once(runs):
    ckpt = runs["ep2"] / "checkpoints" / "step_00000010"
    assert (ckpt / "COMPLETE").exists()
    assert (runs["ep2"] / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    from rundir.checkpoint_store import WEIGHTS, FragmentReader
    reader = FragmentReader(str(ckpt))
    experts = [n for n in reader.names(WEIGHTS) if ".experts." in n]
    assert experts
    for name in experts:   # one fragment per expert-parallel rank: rows 0-7 and 8-15, once each
        frags = reader.by_tensor[(name, WEIGHTS)]
        half = frags[0].numel
        assert [f.start for f in frags] == [0, half] and len({f.file for f in frags}) == 2, name
        assert frags[0].shape[0] == 16, name
    from rundir.state import full_model_state
    state = full_model_state(str(ckpt))
    w = [v for k, v in state.items() if k.endswith("experts.w_in_EDF")]
    assert len(w) == 4 and all(t.shape[0] == 16 for t in w)
    # the two ranks trained different experts: no duplicated halves
    assert not torch.equal(w[0][:8], w[0][8:])


def test_metrics_jsonl_has_every_named_key(runs):
    rows = read_metrics(runs["ep2"])
    keys = set().union(*rows)
    named = ["step", "tokens", "train/loss", "train/z_loss", "train/aux_loss", "train/grad_norm", "train/lr",
             "moe/mean_k", "perf/tokens_per_s", "perf/tflops_per_device", "perf/mfu", "perf/step_s",
             "perf/data_wait_frac", "perf/max_mem_gb", "val/loss"]
    named += [f"train/loss_bin/{i:02d}" for i in range(10)] + [f"val/loss_bin/{i:02d}" for i in range(10)]
    named += [f"moe/{m}/layer{i:02d}" for m in ("drop_frac", "load_cv") for i in range(4)]
    named += ["eval/toy/acc"]   # eval.tasks, every 5 steps
    missing = [k for k in named if k not in keys]
    assert not missing, missing
    train_rows = [r for r in rows if "train/loss" in r]
    assert all(r["moe/load_cv/layer00"] == 0.0 for r in train_rows), "EC is balanced by construction"
    assert all(r["perf/mfu"] is None for r in train_rows), "no known peak on CPU"
    assert rows[0]["step"] == 0 and "val/loss" in rows[0]
    assert train_rows[-1]["tokens"] == 10 * 16 * 128


def test_wandb_offline_run_is_created_and_finishes(runs):
    runs_dirs = glob.glob(str(runs["ep2"] / "wandb" / "offline-run-*"))
    assert len(runs_dirs) == 1, runs_dirs
    run_id = (runs["ep2"] / "wandb_run_id").read_text().strip()
    assert runs_dirs[0].endswith(run_id)
    assert glob.glob(os.path.join(runs_dirs[0], f"run-{run_id}.wandb"))
    log = open(os.path.join(runs_dirs[0], "logs", "debug.log")).read()
    assert "finish" in log.lower()


def test_ranks_share_the_cores_without_omp_num_threads(runs):
    """Under the launcher, with no OMP_NUM_THREADS, each rank takes its share of the cores."""
    from trainer.engine.cpu_threads import usable_cores
    cores = usable_cores()
    assert f"CPU threads per rank: {max(1, cores // 2)} ({cores} cores shared by 2 ranks" in runs["logs"][1]


def test_runs_leave_no_shared_memory_behind(runs):
    """DeepSpeed's CPU shared-memory all-reduce would JIT-build an extension and leave a 64 MiB
    /dev/shm segment per rank after every run (never unlinked); the trainer turns it off."""
    assert not any("shm_comm" in log for log in runs["logs"]), "DeepSpeed built its shm all-reduce"
    leaked = runs["shm_after"] - runs["shm_before"]
    assert not leaked, f"left in /dev/shm: {sorted(leaked)}"


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_resume_is_exact(small_corpus, tmp_path, router):
    """2N steps straight vs N steps, a restart, and N more: identical per-step losses. The TC run
    uses the aux-loss-free expert bias, which must come back from the checkpoint too."""
    common = {"train.schedule_steps": 8, "train.eval_every": 100, "train.save_every": 100,
              "moe.router": router}
    if router == "token_choice":
        common.update({"moe.bias_update_rate": 0.01, "moe.capacity_factor": 1.0})
    else:   # and W&B continues the same run after the restart
        common["wandb.mode"] = "offline"
    straight, split = tmp_path / "straight", tmp_path / "split"
    launch(2, tiny_overrides(small_corpus, straight, **{"train.max_steps": 8, **common}))
    launch(2, tiny_overrides(small_corpus, split, **{"train.max_steps": 4, **common}))
    assert (split / "checkpoints" / "step_00000004" / "COMPLETE").exists()
    launch(2, tiny_overrides(small_corpus, split, **{"train.max_steps": 8, **common}))
    a, b = per_step(straight, "train/loss"), per_step(split, "train/loss")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6), step
    assert per_step(split, "train/lr") == per_step(straight, "train/lr")
    if router == "expert_choice":
        run_id = (split / "wandb_run_id").read_text().strip()
        parts = glob.glob(str(split / "wandb" / "offline-run-*"))
        assert len(parts) == 2 and all(p.endswith(run_id) for p in parts), parts
    if router == "token_choice":   # the bias moved, and was restored (else losses would differ)
        from rundir.state import full_model_state
        state = full_model_state(str(split / "checkpoints" / "step_00000008"))
        bias = {k: v for k, v in state.items() if k.endswith("expert_bias")}
        assert bias and any(float(b.abs().sum()) > 0 for b in bias.values())
