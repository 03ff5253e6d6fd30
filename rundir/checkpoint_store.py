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

A checkpoint is readable only when its COMPLETE manifest verifies (every listed file has its size
and sha256) and its structure holds: plain files inside the checkpoint (no symlink, no `..`), every
tensors/ file listed, each index a list of fragment records whose keys, offsets and sizes agree
with the safetensors header beside it, and no JSON or header larger than a real one could be.
Anything else is damaged: CheckpointError names the file and the problem (verify()).

This file imports only torch, safetensors and the standard library: it is also copied into every
run's checkpoints/ folder as zero_to_fp32.py, the consolidation tool DeepSpeed users reach for,
called as DeepSpeed's own is (docs/operations-safety.md):

    python checkpoints/zero_to_fp32.py checkpoints OUTPUT_DIR [-t step_00000900] [--max_shard_size 5GB]
    python checkpoints/zero_to_fp32.py checkpoints/step_00000900 model_fp32.safetensors
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import struct
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator, Optional

import torch
from safetensors import safe_open

TENSORS_DIR = "tensors"
WEIGHTS, MASTER, EXP_AVG, EXP_AVG_SQ = "weights", "master", "exp_avg", "exp_avg_sq"


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
COMPLETE = "COMPLETE"
STATE = "state.json"
# caps on what a reader takes in: a real index, manifest or state.json is a few MB at most
MAX_JSON_BYTES = 64 << 20
MAX_HEADER_BYTES = 100 << 20   # safetensors' own limit on a header
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*$")   # a tensor name: dotted words, no '/' and no '..'
_STEP_TAG = re.compile(r"^step_\d{8}$")


class CheckpointError(FileNotFoundError):
    """No usable checkpoint where one was named (missing, incomplete, damaged, or incompatible
    with this run); the message names the checkpoint or file and the problem."""


@contextmanager
def atomic_file(path: str, mode: str = "wb"):
    """A new file at `path`, whole or not at all: written to a temporary created exclusively
    (O_EXCL, a random name, never through a planted link) in the same directory, then renamed
    over `path` (rename replaces a link at `path`, it does not write through it)."""
    folder, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_json_capped(path: str, what: str, limit: Optional[int] = None):
    """JSON from a plain file no larger than `limit` (MAX_JSON_BYTES); CheckpointError naming the file otherwise."""
    limit = MAX_JSON_BYTES if limit is None else limit
    if os.path.islink(path):
        raise CheckpointError(f"{path}: a symlink, not a file of this checkpoint; refusing to follow it")
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read {what}: {err.strerror or err}") from None
    if len(raw) > limit:
        raise CheckpointError(f"{path}: {what} larger than {limit:,} bytes; not written by ecdlm, not read")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({err})") from None


# ---- the COMPLETE manifest -------------------------------------------------------------------------
def file_digest(path: str) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def write_manifest(ckpt_dir: str, step: int, files: dict, healthy: bool) -> None:
    """files: {path relative to ckpt_dir: file_digest}. Atomic: the marker exists whole or not at all."""
    with atomic_file(os.path.join(ckpt_dir, COMPLETE), "w") as f:
        json.dump({"step": step, "healthy": healthy, "files": files}, f, indent=1, sort_keys=True)


def _inside(ckpt_dir: str, rel: str) -> bool:
    """`rel` names a plain path below ckpt_dir: relative, normalized, no `..`, no symlink on the way."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or os.path.normpath(rel) != rel \
            or rel.split(os.sep)[0] == ".." or "\\" in rel:
        return False
    path = ckpt_dir
    for part in rel.split(os.sep):
        path = os.path.join(path, part)
        if os.path.islink(path):
            return False
    return True


def read_manifest(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, COMPLETE)
    if not os.path.lexists(path):
        raise CheckpointError(f"{ckpt_dir}: not a complete checkpoint (no {COMPLETE} manifest: the save "
                              f"did not finish)")
    manifest = read_json_capped(path, f"the {COMPLETE} manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not isinstance(manifest.get("step"), int):
        raise CheckpointError(f"{path}: not an ecdlm manifest (damaged, or written by an ecdlm older than the "
                              f"layout-free checkpoint format)")
    for rel, want in files.items():
        if not _inside(ckpt_dir, rel):
            raise CheckpointError(f"{path}: lists {rel!r}, which is not a plain file inside the checkpoint")
        if not (isinstance(want, dict) and isinstance(want.get("size"), int) and isinstance(want.get("sha256"), str)):
            raise CheckpointError(f"{path}: the entry of {rel} is not {{\"size\": int, \"sha256\": str}}")
    return manifest


def verify(ckpt_dir: str, checksums: bool = True) -> dict:
    """Raises CheckpointError naming the first file that is missing, short, changed, or not what
    a checkpoint holds there (see the module's docstring); returns the manifest."""
    manifest = read_manifest(ckpt_dir)
    listed = manifest["files"]
    for rel, want in sorted(listed.items()):
        path = os.path.join(ckpt_dir, rel)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: missing (listed in {COMPLETE})")
        size = os.path.getsize(path)
        if size != want["size"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {want['size']}")
        if checksums and file_digest(path)["sha256"] != want["sha256"]:
            raise CheckpointError(f"{path}: checksum differs from the manifest (the file changed after the save)")
    check_structure(ckpt_dir, listed)
    return manifest


def check_structure(ckpt_dir: str, listed: dict) -> None:
    """What the checksums cannot say: every file of tensors/ is listed, every index agrees with
    its safetensors file, every safetensors header is sane, state.json is a JSON object."""
    tdir = os.path.join(ckpt_dir, TENSORS_DIR)
    if os.path.islink(tdir):
        raise CheckpointError(f"{tdir}: a symlink, not a folder of this checkpoint")
    if os.path.isdir(tdir):
        for name in sorted(os.listdir(tdir)):
            if f"{TENSORS_DIR}/{name}" not in listed:
                raise CheckpointError(f"{os.path.join(tdir, name)}: not listed in {COMPLETE} (planted or left over)")
    for rel in sorted(listed):
        path = os.path.join(ckpt_dir, rel)
        if rel.startswith(TENSORS_DIR + "/") and rel.endswith(".json"):
            st = path[:-len(".json")] + ".safetensors"
            if os.path.relpath(st, ckpt_dir) not in listed:
                raise CheckpointError(f"{path}: its tensor file {st} is not in {COMPLETE}")
            read_index(path, st)
        elif rel.endswith(".safetensors"):
            safetensors_header(path)
        elif rel == STATE and not isinstance(read_json_capped(path, STATE), dict):
            raise CheckpointError(f"{path}: {STATE} is not a JSON object")


def safetensors_header(path: str) -> dict:
    """The header of a safetensors file, checked against the file: CheckpointError naming the
    file and the problem (too large, not JSON, an offset past the data, a size that disagrees)."""
    if os.path.islink(path):
        raise CheckpointError(f"{path}: a symlink, not a file of this checkpoint; refusing to follow it")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} in a file of {size} "
                                      f"bytes; at most {MAX_HEADER_BYTES >> 20} MiB is read)")
            header = json.loads(f.read(n))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data = size - 8 - n
    for key, e in header.items():
        if key == "__metadata__":
            continue
        ok = (isinstance(e, dict) and e.get("dtype") in _ITEMSIZE and isinstance(e.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in e["shape"]) and isinstance(e.get("data_offsets"), list)
              and len(e["data_offsets"]) == 2 and all(isinstance(o, int) for o in e["data_offsets"]))
        if not ok:
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry")
        lo, hi = e["data_offsets"]
        if not 0 <= lo <= hi <= data:
            raise CheckpointError(f"{path}: tensor {key!r} has data offsets [{lo}, {hi}) past the file's "
                                  f"{data} bytes of data")
        if hi - lo != _numel(e["shape"]) * _ITEMSIZE[e["dtype"]]:
            raise CheckpointError(f"{path}: tensor {key!r} spans {hi - lo} bytes, its shape {e['shape']} and "
                                  f"dtype {e['dtype']} need {_numel(e['shape']) * _ITEMSIZE[e['dtype']]}")
    return header


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_safetensors(path: str, tensors: dict, metadata: Optional[dict] = None) -> dict:
    """The safetensors format written tensor by tensor from the tensors' own memory (safetensors'
    save_file first copies every tensor into bytes, a second copy of what a rank saves).
    Atomic (atomic_file). Returns {"size", "sha256"} of the file, hashed
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
    with atomic_file(path) as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            h.update(chunk)
        for t in order:
            if t.numel():
                view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                f.write(view)
                h.update(view)
    return {"size": 8 + len(raw) + offset, "sha256": h.hexdigest()}


def write_json(path: str, obj) -> dict:
    """Atomic JSON file; returns its {"size", "sha256"}."""
    raw = json.dumps(obj).encode()
    with atomic_file(path) as f:
        f.write(raw)
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


_RECORD_FIELDS = {f.name for f in fields(Fragment)} - {"file"}
_KINDS = (WEIGHTS, MASTER, EXP_AVG, EXP_AVG_SQ)


def read_index(idx: str, st: str) -> list:
    """The fragments of one rank's index file, each checked against the header of its safetensors
    file `st`: CheckpointError naming the index, the record and the problem otherwise."""
    records = read_json_capped(idx, "a fragment index")
    if not isinstance(records, list):
        raise CheckpointError(f"{idx}: a fragment index must be a JSON list of records")
    header = safetensors_header(st)
    out = []
    for i, r in enumerate(records):
        where = f"{idx}: record {i}"
        if not isinstance(r, dict) or set(r) != _RECORD_FIELDS:
            got = sorted(r) if isinstance(r, dict) else type(r).__name__
            raise CheckpointError(f"{where} has fields {got}, a fragment has exactly {sorted(_RECORD_FIELDS)}")
        name, kind, start, numel, shape = r["name"], r["kind"], r["start"], r["numel"], r["shape"]
        if not (isinstance(name, str) and _NAME.match(name) and ".." not in name):
            raise CheckpointError(f"{where}: tensor name {name!r} is not a dotted parameter name")
        if kind not in _KINDS:
            raise CheckpointError(f"{where}: kind {kind!r} is not one of {', '.join(_KINDS)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (start, numel))):
            raise CheckpointError(f"{where} ({name}): start, numel and shape must be non-negative integers")
        if start + numel > _numel(shape):
            raise CheckpointError(f"{where} ({name}): elements [{start}, {start + numel}) lie past the end of "
                                  f"its {_numel(shape)}-element tensor")
        if r["key"] != f"{name}/{kind}@{start}":
            raise CheckpointError(f"{where}: key {r['key']!r} should be {name}/{kind}@{start}")
        entry = header.get(r["key"])
        if entry is None:
            raise CheckpointError(f"{where}: key {r['key']!r} is not in {st}")
        if _numel(entry["shape"]) != numel:
            raise CheckpointError(f"{where}: {st} holds {_numel(entry['shape'])} elements under {r['key']!r}, "
                                  f"the index says {numel}")
        out.append(Fragment(file=st, **r))
    return out


class FragmentReader:
    """Every rank's fragments of a checkpoint, read lazily (safetensors slices, memory-mapped).
    Reads what it is given: verify() the checkpoint first (the tools do, whatever path they get)."""

    def __init__(self, ckpt_dir: str):
        index_files = sorted(glob.glob(os.path.join(ckpt_dir, TENSORS_DIR, "rank*.json")))
        if not index_files:
            raise CheckpointError(f"{ckpt_dir}: no {TENSORS_DIR}/rank*.json (not an ecdlm checkpoint of this "
                                  f"format; checkpoints written before the layout-free format cannot be read)")
        self.by_tensor: dict = {}
        self._open: dict = {}
        for idx in index_files:
            for frag in read_index(idx, idx[:-len(".json")] + ".safetensors"):
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
    number of tensors. Verifies the checkpoint first (CheckpointError naming what is wrong).
    Holds every tensor at once, as one file needs."""
    verify(ckpt_dir)
    reader = FragmentReader(ckpt_dir)
    state = {name: (reader.fp32(name) if dtype is None else reader.fp32(name).to(dtype)).contiguous()
             for name in reader.names(WEIGHTS)}
    write_safetensors(out_path, state, metadata={"source": os.path.abspath(ckpt_dir), "format": "ecdlm-fp32"})
    return len(state)


SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def shard_plan(sizes: dict, max_bytes: int) -> list:
    """[[tensor names]] in order, each shard at most max_bytes (a larger tensor alone)."""
    shards, cur, cur_bytes = [], [], 0
    for name, n in sizes.items():
        if cur and cur_bytes + n > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += n
    return shards + ([cur] if cur else [])


def consolidate_dir(ckpt_dir: str, out_dir: str, max_shard_bytes: int) -> list:
    """DeepSpeed's output layout: fp32 tensors as model.safetensors, or as model-0000i-of-0000N
    shards of at most max_shard_bytes with model.safetensors.index.json; one shard in memory at a
    time. Refuses (CheckpointError) an out_dir that already holds any of those names: nothing
    there is replaced. Returns the file names written."""
    verify(ckpt_dir)
    reader = FragmentReader(ckpt_dir)
    names = reader.names(WEIGHTS)
    plan = shard_plan({n: _numel(reader.shape(n)) * 4 for n in names}, max_shard_bytes)
    files = [SINGLE] if len(plan) == 1 else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
                                             for i in range(len(plan))]
    os.makedirs(out_dir, exist_ok=True)
    taken = [f for f in files + ([INDEX] if len(plan) > 1 else []) if os.path.lexists(os.path.join(out_dir, f))]
    if taken:
        raise CheckpointError(f"{os.path.join(out_dir, taken[0])} exists; nothing was written (choose an empty "
                              f"output directory, or remove the old files yourself)")
    meta = {"source": os.path.abspath(ckpt_dir), "format": "pt"}
    total, weight_map = 0, {}
    for shard, file in zip(plan, files):
        tensors = {n: reader.fp32(n).contiguous() for n in shard}
        write_safetensors(os.path.join(out_dir, file), tensors, metadata=meta)
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({n: file for n in shard})
        del tensors
    if len(plan) > 1:
        with atomic_file(os.path.join(out_dir, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        files.append(INDEX)
    return files


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '200MiB' -> 200 * 2**20, '1000' -> 1000 bytes (DeepSpeed's and transformers' units)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"--max_shard_size={text!r} must be a size such as 5GB, 500MB or 200MiB")
    power = " KMGT".index(m.group(2).upper() or " ")
    return max(1, int(float(m.group(1)) * ((1024 if m.group(3) else 1000) ** power)))


def checkpoint_in(folder: str, tag: Optional[str]) -> str:
    """The checkpoint a DeepSpeed-style call names: `folder` itself when it is one (no tag), else
    folder/TAG, else the one folder/latest names (folder may also be a run directory, whose
    checkpoints/ is used). A name that leaves the folder is refused."""
    if os.path.lexists(os.path.join(folder, COMPLETE)) or _STEP_TAG.match(os.path.basename(os.path.normpath(folder))):
        if tag:
            raise CheckpointError(f"{folder} is one checkpoint; -t/--tag {tag} names a checkpoint in the folder "
                                  f"that holds `latest` (give that folder instead)")
        return folder
    if not os.path.exists(os.path.join(folder, "latest")) and os.path.isdir(os.path.join(folder, "checkpoints")):
        folder = os.path.join(folder, "checkpoints")   # a run directory
    if tag is None:
        latest = os.path.join(folder, "latest")
        if not os.path.isfile(latest):
            raise CheckpointError(f"{folder}: no `latest` file and no -t/--tag; give -t step_XXXXXXXX or a "
                                  f"checkpoint directory")
        with open(latest, "rb") as f:
            tag = f.read(256).decode("utf-8", "replace").strip()
        what = f"{latest} names"
    else:
        what = "-t/--tag"
    if not _STEP_TAG.match(tag):
        raise CheckpointError(f"{what} {tag!r}, which is not a step_XXXXXXXX checkpoint inside {folder}")
    path = os.path.join(folder, tag)
    if not os.path.isdir(path) or os.path.islink(path):
        raise CheckpointError(f"{path}: no such checkpoint ({what} {tag})")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Consolidate an ecdlm checkpoint (any parallel layout) into full fp32 tensors, called as "
                    "DeepSpeed's zero_to_fp32.py is: `python zero_to_fp32.py CHECKPOINT_DIR OUTPUT_DIR [-t TAG]`. "
                    "Only safetensors are written, never pickles.")
    p.add_argument("checkpoint_dir", help="the folder holding `latest` (checkpoints/), a run directory, or one "
                                          "checkpoint directory (step_XXXXXXXX)")
    p.add_argument("output_dir", help="output directory: model.safetensors, or shards with "
                                      "model.safetensors.index.json; a path ending in .safetensors: one file")
    p.add_argument("-t", "--tag", help="checkpoint in CHECKPOINT_DIR, e.g. step_00000900 (default: `latest`)")
    p.add_argument("--max_shard_size", default="5GB", help="largest shard (default 5GB)")
    p.add_argument("--safe_serialization", action="store_true", help="accepted for DeepSpeed's calls: always safetensors")
    p.add_argument("--exclude_frozen_parameters", action="store_true",
                   help="accepted for DeepSpeed's calls: ecdlm freezes no parameter")
    p.add_argument("-d", "--debug", action="store_true", help="accepted for DeepSpeed's calls")
    args = p.parse_args(argv)
    try:
        ckpt = checkpoint_in(args.checkpoint_dir, args.tag)
        if args.output_dir.endswith(".safetensors"):
            if os.path.lexists(args.output_dir):
                raise CheckpointError(f"{args.output_dir} exists; nothing was written (choose a new name)")
            n, where = consolidate(ckpt, args.output_dir), args.output_dir
        else:
            files = consolidate_dir(ckpt, args.output_dir, parse_size(args.max_shard_size))
            n, where = len(FragmentReader(ckpt).names(WEIGHTS)), f"{args.output_dir} ({', '.join(files)})"
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {n} fp32 tensors of {ckpt} to {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
