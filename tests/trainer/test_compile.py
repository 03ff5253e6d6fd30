"""train.compile through the real trainer: 2 processes, ep=2, the tiny preset. Eager (ZeRO-2)
against compiled with activation checkpointing, ZeRO-1 for steps 1-5 and, resumed from that
checkpoint, ZeRO-2 for steps 6-10: the same per-step losses and validation ELBO. The backend is
aot_eager (ECDLM_COMPILE_BACKEND): dynamo's capture and AOTAutograd's backward graph, as the
trainer's compiled blocks run them, without inductor's minutes of code generation on a shared CPU."""
import pytest

from tests.trainer.launch import launch, per_step, tiny_overrides


def test_compiled_training_matches_eager_with_checkpointing_zero_and_resume(small_corpus, tmp_path):
    common = {"train.max_steps": 10, "train.schedule_steps": 10, "train.eval_every": 10, "train.save_every": 5,
              "moe.ep_size": 2, "train.setup_timeout_s": 3000}
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    launch(2, tiny_overrides(small_corpus, eager, **common, **{"train.compile": "false"}))
    on = {**common, "train.compile": "true", "model.activation_checkpointing": "true"}
    env = {"ECDLM_COMPILE_BACKEND": "aot_eager"}
    first = launch(2, tiny_overrides(small_corpus, compiled, **{**on, "train.max_steps": 5}),
                   ds_config="ds_configs/zero1.json", env=env, timeout=2400)
    assert "transformer blocks compiled (aot_eager)" in first.stdout + first.stderr
    assert (compiled / "checkpoints" / "step_00000005" / "COMPLETE").exists()
    launch(2, tiny_overrides(small_corpus, compiled, **on), ds_config="ds_configs/zero2.json", env=env, timeout=2400)
    a, b = per_step(eager, "train/loss"), per_step(compiled, "train/loss")
    assert sorted(a) == sorted(b) == list(range(1, 11)), (sorted(a), sorted(b))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a[step], b[step])
    va, vb = per_step(eager, "val/loss"), per_step(compiled, "val/loss")
    assert 10 in va and vb[10] == pytest.approx(va[10], rel=1e-4), (va, vb)
