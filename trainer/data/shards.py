"""Writing one split of the token stream: fixed-size shards, a document index and meta.json."""

from pathlib import Path
from typing import Dict, List

import numpy as np

from .meta import FORMAT_VERSION, META_FILE, write_json_atomic

DOC_INDEX_FILE = "doc_index.npy"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.bin"


class ShardWriter:
    """Appends documents to a split; shards are plain chunks of one concatenated stream.

    Shard boundaries ignore document boundaries on purpose: every shard but the last has
    exactly `shard_tokens` tokens, so the reader maps a stream offset to a shard by
    arithmetic and a packed sequence may simply straddle two shards.
    """

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.num_tokens = 0
        self._shards: List[Dict] = []
        self._file = None
        self._doc_lengths: List[np.ndarray] = []

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append documents whose tokens (each ending in EOD) are concatenated in `tokens`."""
        if tokens.dtype != self.dtype:
            raise TypeError(f"tokens are {tokens.dtype}, this split stores {self.dtype}")
        if int(doc_lengths.sum()) != len(tokens):
            raise ValueError("document lengths do not add up to the number of tokens")
        pos = 0
        while pos < len(tokens):
            if self._file is None or self._shards[-1]["num_tokens"] == self.shard_tokens:
                self._open_next_shard()
            room = self.shard_tokens - self._shards[-1]["num_tokens"]
            piece = tokens[pos : pos + room]
            self._file.write(piece.tobytes())
            self._shards[-1]["num_tokens"] += len(piece)
            pos += len(piece)
        self.num_tokens += len(tokens)
        self._doc_lengths.append(np.asarray(doc_lengths, dtype=np.int64))

    def _open_next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        name = shard_name(len(self._shards))
        self._file = open(self.directory / name, "wb")
        self._shards.append({"file": name, "num_tokens": 0})

    @property
    def num_docs(self) -> int:
        return sum(len(x) for x in self._doc_lengths)

    def close(self, extra_meta: Dict) -> Dict:
        """Finish the shards, write doc_index.npy and meta.json; returns the split's meta."""
        if self._file is not None:
            self._file.close()
            self._file = None
        lengths = np.concatenate(self._doc_lengths) if self._doc_lengths else np.zeros(0, np.int64)
        doc_index = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=doc_index[1:])
        assert doc_index[-1] == self.num_tokens
        np.save(self.directory / DOC_INDEX_FILE, doc_index)
        meta = {
            **extra_meta,
            "format_version": FORMAT_VERSION,
            "split": self.split,
            "num_tokens": self.num_tokens,
            "num_docs": len(lengths),
            "dtype": self.dtype.name,
            "shards": self._shards,
        }
        write_json_atomic(self.directory / META_FILE, meta)
        return meta
