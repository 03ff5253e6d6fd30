"""The checkpoint directory format, without DeepSpeed: names, the COMPLETE manifest, which
checkpoint a run resumes from, pruning, and verification (also a CLI).

    <run_dir>/checkpoints/
        step_00000100/             one checkpoint (files: trainer/engine/checkpoint.py)
            COMPLETE               JSON manifest, written last, after every rank has finished:
                                   {"step", "healthy", "files": {relpath: {"size", "sha256"}}}
        latest                     names the newest COMPLETE checkpoint (atomic replace)
        zero_to_fp32.py            consolidates a checkpoint into one fp32 safetensors file

A checkpoint is usable when its manifest parses and every file it lists has that size and
checksum. Resuming takes the newest usable one; one that fails is named in the log and skipped.

    python -m rundir.checkpoints verify RUN_DIR_OR_CHECKPOINT
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
from typing import Optional

COMPLETE = "COMPLETE"
STATE = "state.json"   # step, data position, schedule, layout and model config (trainer/engine/checkpoint.py)
log = logging.getLogger("ecdlm")


class CheckpointError(FileNotFoundError):
    """No usable checkpoint where one was named (missing, incomplete, damaged, or incompatible
    with this run); the message names the checkpoint and the problem."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def file_digest(path: str) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def write_manifest(ckpt_dir: str, step: int, files: dict, healthy: bool) -> None:
    """files: {path relative to ckpt_dir: file_digest}. Atomic: the marker exists whole or not at all."""
    path = os.path.join(ckpt_dir, COMPLETE)
    with open(path + ".tmp", "w") as f:
        json.dump({"step": step, "healthy": healthy, "files": files}, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def read_manifest(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, COMPLETE)
    if not os.path.exists(path):
        raise CheckpointError(f"{ckpt_dir}: not a complete checkpoint (no {COMPLETE} manifest: the save "
                              f"did not finish)")
    try:
        with open(path) as f:
            manifest = json.load(f)
        manifest["files"], manifest["step"]   # noqa: B018  (both keys must be there)
        return manifest
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path}: not an ecdlm manifest (damaged, or written by an ecdlm older than the "
                              f"layout-free checkpoint format)") from None


def verify(ckpt_dir: str, checksums: bool = True) -> None:
    """Raises CheckpointError naming the first file that is missing, short, or changed."""
    manifest = read_manifest(ckpt_dir)
    for rel, want in sorted(manifest["files"].items()):
        path = os.path.join(ckpt_dir, rel)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: missing (listed in {COMPLETE})")
        size = os.path.getsize(path)
        if size != want["size"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {want['size']}")
        if checksums and file_digest(path)["sha256"] != want["sha256"]:
            raise CheckpointError(f"{path}: checksum differs from the manifest (the file changed after the save)")


def complete_checkpoints(root: str) -> list:
    """Checkpoint directories with a COMPLETE marker, oldest first (not yet verified)."""
    return sorted(d for d in glob.glob(os.path.join(root, "step_*")) if os.path.exists(os.path.join(d, COMPLETE)))


def is_healthy(ckpt_dir: str) -> bool:
    try:
        return bool(read_manifest(ckpt_dir).get("healthy", True))
    except CheckpointError:
        return False


def prune(root: str, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints, and always the newest healthy one."""
    done = complete_checkpoints(root)
    newest = done[-1] if done else None
    healthy = [d for d in done if is_healthy(d)]
    keep = set(done[-keep_last:]) | set(healthy[-1:])
    for d in done:
        if d not in keep:
            shutil.rmtree(d, ignore_errors=True)
    for d in glob.glob(os.path.join(root, "step_*")):   # incomplete leftovers older than the newest
        if newest and d < newest and not os.path.exists(os.path.join(d, COMPLETE)):
            shutil.rmtree(d, ignore_errors=True)


def find_checkpoint(run_dir: str, resume: str) -> Optional[str]:
    """auto: the checkpoint `latest` names, else the newest usable one (None if there is none),
    skipping, with a warning naming the file, any whose manifest does not verify; never: None; anything else: that
    checkpoint directory, which must verify (CheckpointError otherwise). Deterministic, so every
    rank that calls it on the same files makes the same choice."""
    if resume == "never":
        return None
    if resume != "auto":
        if not os.path.isdir(resume):
            raise CheckpointError(f"train.resume={resume}: no such checkpoint directory "
                                  f"(use auto, never, or a checkpoints/step_XXXXXXXX directory)")
        verify(resume)
        return resume
    root = os.path.join(run_dir, "checkpoints")
    candidates = list(reversed(complete_checkpoints(root)))
    latest = os.path.join(root, "latest")
    if os.path.exists(latest):   # `latest` first: normally the newest; a user may point it back
        named = os.path.join(root, open(latest).read().strip())
        candidates = [named] + [c for c in candidates if os.path.abspath(c) != os.path.abspath(named)]
    for ckpt in candidates:
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as err:
            log.warning("skipping checkpoint: %s", err)
    return None


def read_state(ckpt_dir: str) -> dict:
    try:
        with open(os.path.join(ckpt_dir, STATE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{ckpt_dir}: cannot read {STATE}: {err}") from None


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
