"""The report from two short real runs (EC and TC): every figure written and not blank, and the page
shows them all."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np

from tests.trainer.launch import ROOT
from evaluation.report import efficiency, local_slope

FIGURES = ["loss.png", "loss_bins.png", "efficiency.png", "capacity.png", "moe.png"]


def test_report_from_two_real_runs(two_runs, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "evaluation.report", str(two_runs["ec"]), str(two_runs["tc"]),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    # pretraining runs log no generation task: only the task-accuracy figure may be left out
    skipped = proc.stdout.split("skipped:", 1)[1] if "skipped:" in proc.stdout else ""
    assert skipped.strip() in ("", "tasks.png: no run has the data for it"), proc.stdout
    page = (out / "index.html").read_text()
    for name in FIGURES:
        img = mpimg.imread(out / name)
        assert img.shape[0] > 300 and img.shape[1] > 500
        # not blank: many distinct colours, and plenty of non-white pixels
        rgb = (img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
        assert len(np.unique(rgb, axis=0)) > 50, name
        assert (rgb.min(1) < 200).mean() > 0.02, name
        assert re.search(rf'<img src="{re.escape(name)}"', page), name
    for label in ("ec (EC linear_reverse)", "tc (TC)"):   # runs named in the summary table
        assert label in page


def test_local_slope_recovers_a_known_rate():
    t = np.linspace(0, 1e6, 30)
    loss = 5.0 * np.exp(-2e-6 * t)                   # ln L falls at 2 per million tokens
    assert np.allclose(efficiency(t, loss, 5), 2.0)
    noisy = 3 * t + np.random.default_rng(0).normal(0, 1e3, 30)
    assert abs(np.nanmean(local_slope(t, noisy, 9)) - 3) < 0.05
