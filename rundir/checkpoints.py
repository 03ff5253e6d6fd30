"""The checkpoint directory format, without DeepSpeed: names, the COMPLETE manifest, which
checkpoint a run resumes from, pruning, and verification (also a CLI).

    <run_dir>/checkpoints/
        step_00000100/             one checkpoint (files: trainer/engine/checkpoint.py)
            COMPLETE               JSON manifest, written last, after every rank has finished:
                                   {"step", "healthy", "files": {relpath: {"size", "sha256"}}}
        latest                     names the newest COMPLETE checkpoint (atomic replace)
        zero_to_fp32.py            consolidates a checkpoint into fp32 safetensors, called as DeepSpeed's is

A checkpoint is usable when its manifest parses and every file it lists has that size and
checksum, and its structure holds (rundir/checkpoint_store.py). Resuming takes the newest usable
one; one that fails is named in the log, skipped, and not counted towards train.keep_last. Every
tool that reads a checkpoint resolves it here (resolve_checkpoint), whatever path it was given.

    python -m rundir.checkpoints verify RUN_DIR_OR_CHECKPOINT
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import shutil
import sys
from typing import Optional

# the format's reader and checks live with the store: checkpoints/zero_to_fp32.py is that file
from rundir.checkpoint_store import (COMPLETE, STATE, CheckpointError, atomic_file, file_digest,  # noqa: F401
                                     read_json_capped, read_manifest, write_manifest)
from rundir.checkpoint_store import verify as verify_files

log = logging.getLogger("ecdlm")
_STEP_PREFIX = "step_"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def verify(ckpt_dir: str, checksums: bool = True) -> None:
    """Raises CheckpointError naming the first file that is missing, short, changed or malformed
    (rundir/checkpoint_store.verify), or a state.json the trainer cannot resume from."""
    manifest = verify_files(ckpt_dir, checksums)
    if STATE in manifest["files"]:
        read_state(ckpt_dir)


def complete_checkpoints(root: str) -> list:
    """Checkpoint directories with a COMPLETE marker, oldest first (not yet verified)."""
    return sorted(d for d in glob.glob(os.path.join(root, "step_*")) if os.path.exists(os.path.join(d, COMPLETE)))


def is_healthy(ckpt_dir: str) -> bool:
    try:
        return bool(read_manifest(ckpt_dir).get("healthy", True))
    except CheckpointError:
        return False


def prune(root: str, keep_last: int, current: Optional[str] = None, exclude=()) -> None:
    """Keep the newest `keep_last` usable complete checkpoints, and always the newest healthy one.
    A damaged checkpoint (its manifest, sizes or structure do not verify) counts for nothing and
    is left where it is, for a person to look at; so are those in `exclude` (the ones a resume
    skipped: damaged, or newer than what it resumed from) and any newer than `current` (the one
    just saved)."""
    skip = {os.path.basename(os.path.normpath(d)) for d in exclude}
    done = [d for d in complete_checkpoints(root) if os.path.basename(d) not in skip
            and (current is None or os.path.basename(d) <= os.path.basename(os.path.normpath(current)))]
    usable = []
    for d in done:
        try:
            verify(d, checksums=False)   # the checksums were read at resume; here the sizes and structure
            usable.append(d)
        except CheckpointError as err:
            log.warning("not counting checkpoint towards train.keep_last: %s", err)
    newest = usable[-1] if usable else None
    healthy = [d for d in usable if is_healthy(d)]
    keep = set(usable[-keep_last:]) | set(healthy[-1:])
    for d in usable:
        if d not in keep:
            shutil.rmtree(d, ignore_errors=True)
    for d in glob.glob(os.path.join(root, "step_*")):   # incomplete leftovers older than the newest
        if newest and d < newest and not os.path.exists(os.path.join(d, COMPLETE)):
            shutil.rmtree(d, ignore_errors=True)


def write_latest(root: str, step: int) -> None:
    """checkpoints/latest names the checkpoint of `step` (atomic; a planted link is replaced, never followed)."""
    with atomic_file(os.path.join(root, "latest"), "w") as f:
        f.write(tag_for(step) + "\n")


def read_latest(root: str) -> Optional[str]:
    """The checkpoint directory `latest` names, or None when there is no `latest`. It must be a
    step_XXXXXXXX folder inside `root`: anything else (another run's checkpoint, a path with
    `..`, a link) is refused by name, never followed."""
    latest = os.path.join(root, "latest")
    if not os.path.lexists(latest):
        return None
    if os.path.islink(latest) or not os.path.isfile(latest):
        raise CheckpointError(f"{latest}: not a plain file (a link or folder); delete it to resume from the newest "
                              f"checkpoint")
    with open(latest, "rb") as f:
        name = f.read(256).decode("utf-8", "replace").strip()
    if not (name.startswith(_STEP_PREFIX) and len(name) == 13 and name[5:].isdigit()):
        raise CheckpointError(f"{latest} names {name!r}, which is not a step_XXXXXXXX checkpoint inside {root}; "
                              f"refusing to resume from it (fix or delete {latest})")
    path = os.path.join(root, name)
    if os.path.islink(path):
        raise CheckpointError(f"{path}: a link, not a checkpoint of this run; refusing to follow it")
    return path


def find_checkpoint(run_dir: str, resume: str) -> Optional[str]:
    """auto: the checkpoint `latest` names, else the newest usable one (None if there is none),
    skipping, with a warning naming the file, any that does not verify (manifest, sizes,
    checksums, structure, state.json); never: None; anything else: that checkpoint directory,
    which must verify (CheckpointError otherwise). Deterministic, so every rank that calls it on
    the same files makes the same choice."""
    if resume == "never":
        return None
    if resume != "auto":
        if not os.path.isdir(resume):
            raise CheckpointError(f"train.resume={resume}: no such checkpoint directory "
                                  f"(use auto, never, or a checkpoints/step_XXXXXXXX directory)")
        verify(resume)
        return resume
    return newest_usable(os.path.join(run_dir, "checkpoints"))


def newest_usable(root: str) -> Optional[str]:
    """The checkpoint `root/latest` names if it verifies, else the newest one that does."""
    candidates = list(reversed(complete_checkpoints(root)))
    named = read_latest(root)   # `latest` first: normally the newest; a user may point it back
    if named:
        candidates = [named] + [c for c in candidates if os.path.abspath(c) != os.path.abspath(named)]
    for ckpt in candidates:
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as err:
            log.warning("skipping checkpoint: %s", err)
    return None


def resolve_checkpoint(path: str) -> str:
    """The verified checkpoint a tool was pointed at: a checkpoint directory (verified; refused
    by name if damaged), a checkpoints/ folder or a run directory (its newest usable checkpoint).
    CheckpointError with one message per case otherwise."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory (give a run directory, its checkpoints/ "
                              f"folder, or a checkpoints/step_XXXXXXXX directory)")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: a file, not a run or checkpoint directory")
    if os.path.lexists(os.path.join(path, COMPLETE)) or os.path.basename(os.path.normpath(path)).startswith(_STEP_PREFIX):
        verify(path)
        return path
    is_root = os.path.lexists(os.path.join(path, "latest")) or bool(glob.glob(os.path.join(path, "step_*")))
    root = path if is_root else os.path.join(path, "checkpoints")
    ckpt = newest_usable(root)
    if ckpt is not None:
        return ckpt
    if not os.listdir(path):
        raise CheckpointError(f"{path}: an empty directory, not a run (a run holds config.yaml and checkpoints/)")
    if not os.path.isdir(root):
        raise CheckpointError(f"{path}: not a run directory (no checkpoints/ folder)")
    if complete_checkpoints(root):
        raise CheckpointError(f"{root}: every checkpoint is damaged (see the warnings above); nothing was read")
    raise CheckpointError(f"{path}: the run has no complete checkpoint yet (the first is written at "
                          f"train.save_every steps)")


_STATE_FIELDS = {"step": int, "adam_step": int, "scheduler": dict, "engine": dict, "loader": dict,
                 "model_config": dict}


def read_state(ckpt_dir: str) -> dict:
    """state.json, capped in size and checked for the fields a resume reads."""
    path = os.path.join(ckpt_dir, STATE)
    state = read_json_capped(path, STATE)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {STATE} is not a JSON object")
    for name, kind in _STATE_FIELDS.items():
        if not isinstance(state.get(name), kind) or isinstance(state.get(name), bool):
            raise CheckpointError(f"{path}: field {name!r} is {state.get(name)!r}, a {kind.__name__} is needed")
    counters = state["engine"]
    if not all(isinstance(counters.get(k), int) for k in ("global_steps", "global_samples", "skipped_steps")):
        raise CheckpointError(f"{path}: engine must hold integer global_steps, global_samples and skipped_steps")
    return state


# what a resumed run may not change: the shapes of its tensors, the routing, the global batch
FIXED_FIELDS = (("model", ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "qk_norm")),
                ("moe", ("router", "num_experts", "expert_hidden", "num_shared_experts", "shared_expert_hidden",
                         "moe_every", "dense_hidden")))


def check_resumable(cfg, ckpt_dir: str) -> None:
    """Raises CheckpointError naming the first field a resume from `ckpt_dir` cannot change, with
    both values. World size, moe.ep_size, ZeRO stage and micro-batch size may all change."""
    state = read_state(ckpt_dir)
    saved = state.get("model_config", {})
    for section, fields in FIXED_FIELDS:
        for name in fields:
            was, now = saved.get(section, {}).get(name), getattr(getattr(cfg, section), name)
            if was != now:
                raise CheckpointError(f"cannot resume from {ckpt_dir}: {section}.{name} was {was!r} there, "
                                      f"{now!r} now (start a new run, or set train.resume=never)")
    was = state.get("loader", {}).get("global_batch_size")
    if was != cfg.train.global_batch_size:
        raise CheckpointError(f"cannot resume from {ckpt_dir}: train.global_batch_size was {was} there, "
                              f"{cfg.train.global_batch_size} now (the data position and schedule count "
                              f"global batches)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Verify ecdlm checkpoints against their COMPLETE manifests.")
    p.add_argument("verb", choices=["verify"])
    p.add_argument("path", help="a run directory (every checkpoint) or one checkpoint directory")
    args = p.parse_args(argv)
    ckpts = ([args.path] if os.path.exists(os.path.join(args.path, COMPLETE)) or
             os.path.basename(os.path.normpath(args.path)).startswith("step_")
             else complete_checkpoints(os.path.join(args.path, "checkpoints")))
    if not ckpts:
        print(f"{args.path}: no checkpoints", file=sys.stderr)
        return 1
    bad = 0
    for ckpt in ckpts:
        try:
            verify(ckpt)
            print(f"ok       {ckpt}")
        except CheckpointError as err:
            bad += 1
            print(f"DAMAGED  {err}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
