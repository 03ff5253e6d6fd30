"""The on-disk description of a prepared dataset, and the check that it fits a model."""

import json
from pathlib import Path
from typing import Mapping, Optional, Union

from rundir.errors import DataError

# Bumped whenever the layout of a prepared directory changes incompatibly.
FORMAT_VERSION = 1
META_FILE = "meta.json"


def load_meta(path: Union[str, Path]) -> dict:
    """Read `meta.json` from a prepared directory or one of its split directories."""
    path = Path(path)
    file = path if path.name == META_FILE else path / META_FILE
    if not file.is_file():
        raise DataError(
            f"{file} does not exist: {path} is not a prepared dataset "
            "(run `python -m trainer.data prepare --out DIR` first)"
        )
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{file} is not valid JSON ({err}): the prepared dataset is damaged; re-run prepare") from None
    if not isinstance(meta, dict):
        raise DataError(f"{file} holds a JSON {type(meta).__name__}, not an object: the prepared dataset is "
                        "damaged; re-run prepare")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{file} has format_version={version}, this code reads {FORMAT_VERSION}; re-run prepare"
        )
    return meta


# What a prepared directory holds; pretraining directories predate the "format" key.
DATA_FORMATS = ("pretrain", "sft")


def data_format(path: Union[str, Path]) -> str:
    """"pretrain" (token shards, packed at load time) or "sft" (fixed-length prompt/response
    examples) for a prepared directory or one of its split directories."""
    meta = load_meta(path)
    fmt = meta.get("format", "pretrain")
    if fmt not in DATA_FORMATS:
        raise DataError(f"{path}/{META_FILE} has format={fmt!r}; this code reads {' or '.join(DATA_FORMATS)}")
    return fmt


def write_json_atomic(path: Path, obj: Mapping) -> None:
    """Write JSON so that a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def check_vocab(
    meta: Union[Mapping, str, Path],
    vocab_size: int,
    pad_id: int,
    mask_id: int,
    *,
    data_path: Optional[Union[str, Path]] = None,
) -> None:
    """Raise DataError unless the data's tokenizer matches the model's vocabulary.

    `meta` is a prepared directory (or split directory) or its already loaded meta dict.
    Run this before building the model: a mismatch otherwise surfaces as an index error
    deep inside an embedding, or worse, as silently wrong mask/pad handling.
    """
    if not isinstance(meta, Mapping):
        data_path = data_path if data_path is not None else meta
        meta = load_meta(meta)
    where = f"data at {data_path}" if data_path is not None else "the data"
    sha = str(meta.get("tokenizer_sha256", "?"))[:12]
    problems = []
    for field, wanted in (("vocab_size", vocab_size), ("pad_id", pad_id), ("mask_id", mask_id)):
        have = meta.get(field)
        if have != wanted:
            problems.append(
                f"{where} was tokenized with {field}={have} (tokenizer sha256 {sha}...), "
                f"but model.{field}={wanted}; set model.{field}={have} or re-run prepare"
            )
    if problems:
        raise DataError("; ".join(problems))
