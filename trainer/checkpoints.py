"""The checkpoint directory format, without DeepSpeed: names, the COMPLETE marker, which
checkpoint a run resumes from, and pruning. The trainer's engine side (trainer/engine/checkpoint.py)
writes checkpoints; evaluation reads them through these rules.

    <run_dir>/checkpoints/
        step_00000100/ ...         one checkpoint (see trainer/engine/checkpoint.py for its files)
            COMPLETE               written last, after every rank has finished
        latest                     names the newest COMPLETE checkpoint (atomic replace)
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import Optional

COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: str) -> list:
    dirs = sorted(d for d in glob.glob(os.path.join(root, "step_*")) if os.path.exists(os.path.join(d, COMPLETE)))
    return dirs


def prune(root: str, keep_last: int) -> None:
    done = complete_checkpoints(root)
    newest = done[-1] if done else None
    for d in done[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    for d in glob.glob(os.path.join(root, "step_*")):   # incomplete leftovers older than the newest
        if newest and d < newest and not os.path.exists(os.path.join(d, COMPLETE)):
            shutil.rmtree(d, ignore_errors=True)


def find_checkpoint(run_dir: str, resume: str) -> Optional[str]:
    """auto: the newest COMPLETE checkpoint of the run (None if there is none); never: None;
    anything else: that checkpoint directory, which must be complete."""
    if resume == "never":
        return None
    if resume != "auto":
        if not os.path.exists(os.path.join(resume, COMPLETE)):
            raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint directory "
                                    f"(no {COMPLETE} marker)")
        return resume
    root = os.path.join(run_dir, "checkpoints")
    latest = os.path.join(root, "latest")
    if os.path.exists(latest):
        path = os.path.join(root, open(latest).read().strip())
        if os.path.exists(os.path.join(path, COMPLETE)):
            return path
    done = complete_checkpoints(root)
    return done[-1] if done else None
