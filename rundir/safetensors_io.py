"""Safetensors directories in the Hugging Face layout: a streaming sharded writer and a reader.

    with ShardedWriter(out_dir, max_shard_bytes=5 << 30) as w:
        for name, tensor in tensors:        # one at a time: only the open shard is held
            w.add(name, tensor)
    for name, tensor in iter_safetensors_dir(out_dir): ...

One shard is written as `model.safetensors`; more as `model-00001-of-0000N.safetensors` with the
standard `model.safetensors.index.json` (`metadata.total_size`, `weight_map`). Only safetensors and
JSON are ever read: a directory holding pickled weights alone is refused, never unpickled.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '200MiB' -> 200 * 2**20, '1000' -> 1000 bytes (as transformers reads them)."""
    m = _SIZE.match(str(text))
    unit = (m.group(2).upper() if m else "")
    unit = unit if unit.endswith("B") or unit == "" else unit + "B"
    if not m or unit not in _UNITS:
        raise ValueError(f"--max-shard-size={text!r} must be a size such as 5GB, 500MB or 200MiB")
    return max(1, int(float(m.group(1)) * _UNITS[unit]))


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardedWriter:
    """Collects tensors into shards of at most `max_shard_bytes` (a bigger tensor gets a shard of
    its own) and writes each shard as soon as it is full, so memory holds one shard at most."""

    def __init__(self, out_dir: str, max_shard_bytes: int, metadata: Optional[dict] = None):
        self.out_dir, self.max_bytes = out_dir, max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending: dict = {}
        self.pending_bytes = 0
        self.shards: list = []          # [(temporary file name, [tensor names])]
        self.total_bytes = 0
        os.makedirs(out_dir, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in names for _, names in self.shards):
            raise ValueError(f"tensor {name!r} written twice")
        size = tensor_bytes(tensor)
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        # contiguous, and a copy of no more than itself: safetensors writes the storage as is
        self.pending[name] = tensor.detach().contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        tmp = f"shard-{len(self.shards):05d}.tmp.safetensors"
        save_file(self.pending, os.path.join(self.out_dir, tmp), metadata=self.metadata)
        self.shards.append((tmp, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list:
        """Name the shards (the count is only known now) and write the index; returns file names."""
        self.flush()
        n = len(self.shards)
        if n == 0:
            raise ValueError("no tensors were written")
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (tmp, _), final in zip(self.shards, names):
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
        if n > 1:
            weight_map = {t: final for (_, tensors), final in zip(self.shards, names) for t in tensors}
            with open(os.path.join(self.out_dir, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
        return names

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()


def shard_files(path: str) -> list:
    """The safetensors files of a directory, in index order; refuses pickled-only directories."""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        return list(dict.fromkeys(read_weight_map(index).values()))
    if os.path.exists(os.path.join(path, SINGLE)):
        check_safetensors(os.path.join(path, SINGLE))
        return [SINGLE]
    pickled = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json") if os.path.exists(os.path.join(path, f))]
    why = (f"only pickled weights ({pickled[0]}), which are never loaded here: convert them to safetensors "
           "where you trust them" if pickled else f"no {SINGLE} or {INDEX}")
    raise FileNotFoundError(f"{path}: {why}")


MAX_INDEX_BYTES = 64 << 20


def read_weight_map(index: str) -> dict:
    """{tensor: shard file} of an index. Every shard must be a plain file name in the index's own
    directory: a name with a path in it (`../other/model.safetensors`) is refused, never read."""
    from rundir.checkpoint_store import CheckpointError, read_json_capped
    try:
        data = read_json_capped(index, "a safetensors index")
    except CheckpointError as err:
        raise ValueError(str(err)) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no weight_map object of tensor names to shard files")
    folder = os.path.dirname(index)
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or os.path.basename(file) != file or file in ("", ".", "..") \
                or not file.endswith(".safetensors"):
            raise ValueError(f"{index}: weight_map[{tensor!r}] = {file!r} is not a .safetensors file name in "
                             f"{folder}; refusing to read outside the directory")
    for file in dict.fromkeys(weight_map.values()):
        check_safetensors(os.path.join(folder, file))
    return weight_map


def check_safetensors(file: str) -> None:
    """ValueError naming `file` when it is not a safetensors file (before safetensors' own parser
    sees it, whose errors do not name the file)."""
    try:
        with safe_open(file, framework="pt"):
            pass
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: missing (named by the directory's weights)") from None
    except Exception as err:   # noqa: BLE001 - safetensors' error type has no stable import path
        raise ValueError(f"{file}: not a safetensors file ({err})") from None


def tensor_names(path: str) -> list:
    names = []
    for file in shard_files(path):
        with safe_open(os.path.join(path, file), framework="pt") as f:
            names.extend(f.keys())
    return names


def iter_safetensors_dir(path: str) -> Iterator[tuple]:
    """(name, tensor) for every tensor of a safetensors directory, one file open at a time."""
    for file in shard_files(path):
        with safe_open(os.path.join(path, file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def read_safetensors_dir(path: str) -> dict:
    return dict(iter_safetensors_dir(path))
