"""The perplexity CLI reproduces the trainer's own validation ELBO for the same checkpoint."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.trainer.launch import ROOT, read_metrics


def test_cli_matches_the_trainer_s_validation_loss(two_runs):
    run = two_runs["tc"]
    last = [r for r in read_metrics(run) if "val/loss" in r][-1]
    proc = subprocess.run([sys.executable, "-m", "evaluation.perplexity", str(run), "--batches", "2", "--batch-size", "8",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert abs(res["loss"] - last["val/loss"]) < 1e-4 * last["val/loss"]
    assert res["ppl_bound"] == math.exp(res["loss"])
    for j in range(10):
        assert abs(res[f"loss_bin/{j:02d}"] - last[f"val/loss_bin/{j:02d}"]) < 1e-3
