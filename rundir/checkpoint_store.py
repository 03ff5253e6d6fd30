"""The layout-free tensor store of a checkpoint: every tensor (weights, fp32 master weights, Adam
moments) is recorded as fragments of its full, flattened self, whatever the parallel layout that
wrote it.

    <checkpoint>/tensors/rank00003.safetensors   the fragments rank 3 owned (no pickle)
    <checkpoint>/tensors/rank00003.json          their index: one record per fragment
        {"key": "<name>/<kind>@<start>", "name": "blocks.1.ffn.experts.w_in_EDF", "kind": "exp_avg",
         "start": 4096, "numel": 2048, "shape": [8, 64, 256], "dtype": "float32"}

A fragment is elements [start, start + numel) of the full tensor flattened in row-major order.
Under ZeRO-1/2 each rank owns a contiguous piece of every optimizer partition, and under expert
parallelism a rank's experts are a contiguous block of rows of the full [E, ...] tensor, so both
map to such ranges. Together the fragments of a (name, kind) cover the full tensor exactly once;
a reader of any layout assembles the range it needs from whichever files hold it.

This file imports only torch, safetensors and the standard library: it is also copied into every
run's checkpoints/ folder as zero_to_fp32.py, the consolidation tool DeepSpeed users reach for:

    python checkpoints/zero_to_fp32.py checkpoints/step_00000900 model_fp32.safetensors
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from safetensors import safe_open

TENSORS_DIR = "tensors"
WEIGHTS, MASTER, EXP_AVG, EXP_AVG_SQ = "weights", "master", "exp_avg", "exp_avg_sq"


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_safetensors(path: str, tensors: dict, metadata: Optional[dict] = None) -> dict:
    """The safetensors format written tensor by tensor from the tensors' own memory (safetensors'
    save_file first copies every tensor into bytes, a second copy of what a rank saves).
    Atomic: written to path.tmp, then renamed. Returns {"size", "sha256"} of the file, hashed
    while writing so that the manifest needs no second read."""
    header, offset, order = {}, 0, []
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
        order.append(t)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)   # the data starts 8-byte aligned
    h = hashlib.sha256()
    with open(path + ".tmp", "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            h.update(chunk)
        for t in order:
            if t.numel():
                view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                f.write(view)
                h.update(view)
    os.replace(path + ".tmp", path)
    return {"size": 8 + len(raw) + offset, "sha256": h.hexdigest()}


def write_json(path: str, obj) -> dict:
    """Atomic JSON file; returns its {"size", "sha256"}."""
    raw = json.dumps(obj).encode()
    with open(path + ".tmp", "wb") as f:
        f.write(raw)
    os.replace(path + ".tmp", path)
    return {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}

@dataclass
class Fragment:
    file: str
    key: str
    name: str
    kind: str
    start: int
    numel: int
    shape: list
    dtype: str


class FragmentWriter:
    """One rank's fragments: add() them, then write() the rank's safetensors file and its index."""

    def __init__(self, ckpt_dir: str, rank: int):
        self.dir = os.path.join(ckpt_dir, TENSORS_DIR)
        self.stem = f"rank{rank:05d}"
        self.tensors: dict = {}
        self.records: list = []

    def add(self, name: str, kind: str, full_shape, start: int, flat: torch.Tensor) -> None:
        """`flat` is elements [start, start + len) of tensor `name` (full shape `full_shape`)."""
        key = f"{name}/{kind}@{start}"
        self.tensors[key] = flat.detach().reshape(-1)   # a view: written from its own memory
        self.records.append({"key": key, "name": name, "kind": kind, "start": int(start),
                             "numel": int(flat.numel()), "shape": [int(s) for s in full_shape],
                             "dtype": str(flat.dtype).replace("torch.", "")})

    def write(self) -> dict:
        """Writes both files (each atomically); returns {path: {"size", "sha256"}}."""
        os.makedirs(self.dir, exist_ok=True)
        st, idx = os.path.join(self.dir, self.stem + ".safetensors"), os.path.join(self.dir, self.stem + ".json")
        return {st: write_safetensors(st, self.tensors), idx: write_json(idx, self.records)}


class FragmentReader:
    """Every rank's fragments of a checkpoint, read lazily (safetensors slices, memory-mapped)."""

    def __init__(self, ckpt_dir: str):
        index_files = sorted(glob.glob(os.path.join(ckpt_dir, TENSORS_DIR, "rank*.json")))
        if not index_files:
            raise FileNotFoundError(f"{ckpt_dir}: no {TENSORS_DIR}/rank*.json (not an ecdlm checkpoint of this "
                                    f"format; checkpoints written before the layout-free format cannot be read)")
        self.by_tensor: dict = {}
        self._open: dict = {}
        for idx in index_files:
            st = idx[:-len(".json")] + ".safetensors"
            with open(idx) as f:
                for r in json.load(f):
                    frag = Fragment(file=st, **r)
                    self.by_tensor.setdefault((frag.name, frag.kind), []).append(frag)
        for frags in self.by_tensor.values():
            frags.sort(key=lambda fr: fr.start)

    def names(self, kind: str = WEIGHTS) -> list:
        return sorted(n for n, k in self.by_tensor if k == kind)

    def has(self, name: str, kind: str) -> bool:
        return (name, kind) in self.by_tensor

    def shape(self, name: str, kind: str = WEIGHTS) -> list:
        return list(self.by_tensor[(name, kind)][0].shape)

    def _handle(self, path: str):
        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path]

    def flat_range(self, name: str, kind: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the full flattened tensor, from whichever fragments hold them."""
        frags = self.by_tensor.get((name, kind))
        if not frags:
            raise KeyError(f"checkpoint has no {kind} for tensor {name}")
        out, filled = None, 0
        for fr in frags:
            lo, hi = max(start, fr.start), min(end, fr.start + fr.numel)
            if lo >= hi:
                continue
            piece = self._handle(fr.file).get_slice(fr.key)[lo - fr.start:hi - fr.start]
            if out is None:
                out = torch.empty(end - start, dtype=piece.dtype)
            out[lo - start:hi - start] = piece
            filled += hi - lo
        if filled != end - start:
            raise ValueError(f"checkpoint fragments of {name} ({kind}) cover {filled} of the {end - start} "
                             f"elements [{start}, {end}): a rank's file is missing")
        return out

    def full(self, name: str, kind: str = WEIGHTS) -> torch.Tensor:
        shape = self.shape(name, kind)
        numel = 1
        for s in shape:
            numel *= s
        return self.flat_range(name, kind, 0, numel).view(shape)

    def iter_full(self, kind: str = WEIGHTS) -> Iterator[tuple]:
        """(name, full tensor) one at a time: peak memory is one tensor, not the model."""
        for name in self.names(kind):
            yield name, self.full(name, kind)

    def fp32(self, name: str) -> torch.Tensor:
        """The fp32 master weights where they were kept apart from the weights (bf16 training),
        else the weights themselves (fp32 training keeps no separate copy)."""
        if self.has(name, MASTER):
            return self.full(name, MASTER)
        return self.full(name, WEIGHTS).float()


def consolidate(ckpt_dir: str, out_path: str, dtype: Optional[torch.dtype] = None) -> int:
    """One safetensors file holding the full fp32 state dict (experts included); returns the
    number of tensors. Holds every tensor at once, as safetensors' writer needs."""
    reader = FragmentReader(ckpt_dir)
    state = {name: (reader.fp32(name) if dtype is None else reader.fp32(name).to(dtype)).contiguous()
             for name in reader.names(WEIGHTS)}
    write_safetensors(out_path, state, metadata={"source": os.path.abspath(ckpt_dir), "format": "ecdlm-fp32"})
    return len(state)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Consolidate an ecdlm checkpoint (any parallel layout) into one "
                                            "safetensors file of full fp32 tensors.")
    p.add_argument("checkpoint", help="a checkpoint directory (step_XXXXXXXX)")
    p.add_argument("output", help="output .safetensors file (a directory: model_fp32.safetensors inside it)")
    args = p.parse_args(argv)
    out = args.output
    if os.path.isdir(out):
        out = os.path.join(out, "model_fp32.safetensors")
    n = consolidate(args.checkpoint, out)
    print(f"wrote {n} tensors to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
