"""Reading one prepared split: the shards memory-mapped as one concatenated token stream."""

import bisect
from pathlib import Path
from typing import List, Union

import numpy as np

from rundir.errors import DataError
from .meta import load_meta
from .shards import DOC_INDEX_FILE


class TokenStore:
    """The token stream of `split_dir` (e.g. DIR/train); reads copy only what they ask for."""

    def __init__(self, split_dir: Union[str, Path]):
        self.path = Path(split_dir)
        self.meta = load_meta(self.path)
        if "split" not in self.meta:
            raise DataError(f"{self.path} is a prepared directory, not a split; use {self.path / 'train'}")
        if self.meta.get("format", "pretrain") != "pretrain":
            raise DataError(f"{self.path} holds {self.meta['format']} examples, not a token stream: read it with "
                            f"SFTLoader (train.mode=sft), or prepare pretraining data without --format sft")
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self._shards: List[np.ndarray] = []
        self._starts = [0]
        for shard in self.meta["shards"]:
            file, count = self.path / shard["file"], int(shard["num_tokens"])
            expected = count * self.dtype.itemsize
            actual = file.stat().st_size if file.exists() else None
            if actual != expected:
                raise DataError(
                    f"{file} should hold {count} tokens ({expected} bytes) but "
                    f"{'is missing' if actual is None else f'has {actual} bytes'}; re-run prepare"
                )
            # np.memmap refuses empty files; an empty shard contributes nothing anyway.
            tokens = np.memmap(file, dtype=self.dtype, mode="r", shape=(count,)) if count else np.zeros(0, self.dtype)
            self._shards.append(tokens)
            self._starts.append(self._starts[-1] + count)
        self.num_tokens = self._starts[-1]
        # every id read is checked against the tokenizer's vocabulary: a shard of the right size can
        # still hold garbage, which would otherwise surface as an embedding IndexError (on a GPU a
        # device-side assert) far from its cause
        self.vocab_size = self.meta.get("vocab_size")
        if self.num_tokens != self.meta["num_tokens"]:
            raise DataError(f"{self.path}: shards hold {self.num_tokens} tokens, meta.json says {self.meta['num_tokens']}")

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream as a fresh array (it may span shards)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        out = np.empty(stop - start, dtype=self.dtype)
        shard = bisect.bisect_right(self._starts, start) - 1
        pos = start
        while pos < stop:
            base = self._starts[shard]
            take = min(stop, self._starts[shard + 1]) - pos
            out[pos - start : pos - start + take] = self._shards[shard][pos - base : pos - base + take]
            pos += take
            shard += 1
        if self.vocab_size is not None and len(out) and int(out.max()) >= self.vocab_size:
            self._bad_id(out, start)
        return out

    def _bad_id(self, out: np.ndarray, start: int) -> None:
        i = int(np.argmax(out >= self.vocab_size))
        pos = start + i
        shard = bisect.bisect_right(self._starts, pos) - 1
        name = self.meta["shards"][shard]["file"]
        raise DataError(f"{self.path / name}: token id {int(out[i])} at token offset {pos - self._starts[shard]} "
                        f"(byte {(pos - self._starts[shard]) * self.dtype.itemsize}) is not below the vocabulary "
                        f"size {self.vocab_size} of meta.json: the shard is damaged; re-run prepare")

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.num_tokens)
            if step != 1:
                raise IndexError("TokenStore supports only contiguous slices")
            return self.read(start, max(start, stop))
        index = int(key) + (self.num_tokens if key < 0 else 0)
        return self.read(index, index + 1)[0]

    def doc_index(self) -> np.ndarray:
        """Start offset of every document in the stream, plus the final end (int64)."""
        return np.load(self.path / DOC_INDEX_FILE, mmap_mode="r")
