"""Which code a benchmark measured. Other people edit the model while benchmarks run, so a table
names the commit, the files changed since it and a hash of model/ as it was on disk, and the
multi-process runs execute a snapshot of the sources taken at the start."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("model", "rundir", "trainer", "evaluation", "configs", "ds_configs", "train.py")   # all that `train.py` runs


def model_sha(root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for f in sorted((root / "model").rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()[:12]


def code_state() -> dict:
    """The commit, the tracked files changed since it, and model/'s hash as it is on disk now."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": git("diff", "--name-only", "HEAD").split(),
            "model_sha": model_sha()}


def snapshot_code(dest: str) -> str:
    """Copy the sources the trainer runs to `dest`, so that every run of one benchmark executes the
    same code even while someone edits the working tree. Returns the snapshot's model/ sha."""
    for d in CODE_DIRS:
        if (ROOT / d).is_file():
            shutil.copy2(ROOT / d, os.path.join(dest, d))
            continue
        shutil.copytree(ROOT / d, os.path.join(dest, d), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return model_sha(Path(dest))
