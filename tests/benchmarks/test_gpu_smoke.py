"""benchmarks/gpu.sh --cpu-smoke: the GPU measurement's own code at toy shapes on the CPU, so the
script a lent GPU runs cannot rot between loans. Checks what it wrote, never how fast."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_script_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--cpu-smoke", "--smoke-deepspeed", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    every = json.loads((tmp_path / "gpu_all.json").read_text())
    assert every["meta"]["cpu_model"] and every["meta"]["cpu_smoke"] is True
    assert set(every["skipped"]) <= {"deepspeed layer"}, every["skipped"]

    checks = every["check"]
    assert all(r["ok"] for r in checks), [r for r in checks if not r["ok"]]
    names = {r["check"].split("/")[0] for r in checks}
    assert names == {"routing", "layer_bfloat16", "grouped_mm"}
    for r in checks:   # bf16 differs from fp32, but not by nothing: the comparison really ran
        if r["check"].startswith("layer_"):
            assert 1e-4 < r["error"] < 1e-2, r

    layers = every["layer"]
    for shape in ("owt", "8b_a1b"):
        impls = {r["impl"]: r for r in layers if r["shape"] == shape}
        assert set(impls) == {"ec_static", "ec_linear_reverse", "tc_cf1", "tc_dropless", "dense"}
        assert all(r["ms"] > 0 and r["tflop_per_s"] > 0 for r in impls.values())
        # EC static computes exactly k slots per token; TC cf 1.0 at least as many (padding)
        assert impls["ec_static"]["mean_k"] == impls["dense"]["mean_k"] == impls["ec_static"]["k"]
        assert impls["tc_cf1"]["mean_k"] >= impls["ec_static"]["k"]

    steps = {r["config"]: r for r in every["step"]}
    assert set(steps) == {"owt_ec", "owt_tc"}
    for r in steps.values():
        assert r["tokens_per_s"] > 0 and r["tflop_per_step"] > 0
        assert r["sdpa_flash"], r["sdpa_kernels"]   # the CPU's flash kernel, as the GPU's
    # linear_reverse EC reads its capacities once per MoE layer; TC routes with fixed shapes
    assert steps["owt_ec"]["counted_syncs_in_moe_layers"] == steps["owt_ec"]["moe_layers"]
    # the same presets through the real DeepSpeed engine (ZeRO-2), where DeepSpeed imports
    engine = {r["config"]: r for r in every["engine"]}
    assert set(engine) == {"owt_ec", "owt_tc"}
    assert all(r["tokens_per_s"] > 0 and r["tflop_per_s"] > 0 and r["zero_stage"] == 2 for r in engine.values())
    assert "machine:" in proc.stdout and "wrote" in proc.stdout.splitlines()[-1]
