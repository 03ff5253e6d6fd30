"""What an export wrote, so that a later export into the same directory replaces only that.

    OUT_DIR/ecdlm-export.json     {"files": {name: {"size", "sha256"}}}, written last

An export never deletes or overwrites a file it did not write. Before writing, every file in
OUT_DIR that the export could write (weights `model*.safetensors` and their index, config.json,
the remote code, the tokenizer files) must be one an earlier ecdlm export wrote, unchanged since
(size and sha256 as recorded); otherwise the export is refused, naming the file. The earlier
export's weight files are then removed, so that old shards never mix with new ones. Other files
(a README, notes) are left as they are.
"""
from __future__ import annotations

import json
import os

from rundir.checkpoint_store import CheckpointError, atomic_file, file_digest, read_json_capped

from .ecdlm_format import CODE_FILES
from .tokenizer import TOKENIZER_FILES

RECORD = "ecdlm-export.json"
FIXED_NAMES = ("config.json", "generation_config.json", *CODE_FILES, *TOKENIZER_FILES, RECORD)


def is_weight_file(name: str) -> bool:
    return name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".index.json"))


class ExportRefused(ValueError):
    """The output directory holds a file this export would replace but did not write."""


def earlier_export(out_dir: str) -> dict:
    """{name: digest} of the files an earlier export wrote that are still as it wrote them."""
    path = os.path.join(out_dir, RECORD)
    if not os.path.isfile(path) or os.path.islink(path):
        return {}
    try:
        files = read_json_capped(path, "an export record").get("files", {})
    except (CheckpointError, AttributeError):
        return {}
    ours = {}
    for name, want in files.items() if isinstance(files, dict) else ():
        p = os.path.join(out_dir, str(name))
        if os.path.basename(str(name)) == name and os.path.isfile(p) and not os.path.islink(p) \
                and isinstance(want, dict) and file_digest(p) == want:
            ours[name] = want
    return ours


def claim(out_dir: str) -> None:
    """Make OUT_DIR ready for an export: refuse (ExportRefused naming the file) if it holds a file
    the export would write that no earlier export wrote; remove the earlier export's weights."""
    if not os.path.exists(out_dir):
        os.makedirs(out_dir)
        return
    if not os.path.isdir(out_dir):
        raise ExportRefused(f"{out_dir}: a file, not a directory")
    ours = earlier_export(out_dir)
    for name in sorted(os.listdir(out_dir)):
        if (is_weight_file(name) or name in FIXED_NAMES) and name not in ours and name != RECORD:
            raise ExportRefused(f"{os.path.join(out_dir, name)} was not written by an ecdlm export (or changed "
                                f"since); refusing to replace it: export into an empty directory, or move it away")
    for name in ours:
        if is_weight_file(name):
            os.remove(os.path.join(out_dir, name))


def write_record(out_dir: str, names: list) -> None:
    files = {n: file_digest(os.path.join(out_dir, n)) for n in sorted(set(names))}
    with atomic_file(os.path.join(out_dir, RECORD), "w") as f:
        json.dump({"files": files}, f, indent=1)
