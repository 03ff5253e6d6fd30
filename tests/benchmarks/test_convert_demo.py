"""benchmarks/convert_demo.py at toy size (issue 23): the whole path runs (transformers' AR training,
save_pretrained, the import CLI, init.from, both diffusion runs, the trainer's evaluate) and writes
its JSON; nothing about the numbers is judged here (docs/convert.md holds the measured run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.trainer.launch import ROOT


def test_convert_demo_runs_at_toy_size(small_corpus, tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "benchmarks/convert_demo.py", "--data", str(small_corpus), "--work",
                           str(tmp_path / "work"), "--out", str(out), "--toy", "--ar-steps", "3", "--dlm-steps", "2",
                           "--eval-every", "1", "--batch", "2", "--seq-len", "32", "--d-model", "32", "--layers", "1",
                           "--experts", "4", "--expert-hidden", "8", "--k", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [r["step"] for r in doc["converted"]] == [r["step"] for r in doc["scratch"]] == [0, 1, 2]
    assert len(doc["ar"]) == 3 and doc["meta"]["cpu_model"] and "loadavg_start" in doc["meta"]
    assert doc["model"]["moe_router"] == "expert_choice" and doc["model"]["model"]["attention"] == "bidirectional"
    # the converted run starts from the AR weights, the scratch run from ecdlm's initialization
    assert doc["summary"]["converted_step0_val_elbo"] != doc["summary"]["scratch_step0_val_elbo"]
    assert (tmp_path / "work" / "imported" / "checkpoints" / "latest").exists()
