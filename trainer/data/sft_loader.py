"""Training-side loading of SFT data (`prepare --format sft`): examples with their prompt masks.

Global position p holds example perm_e[p mod N] of the split, where e = p // N is the epoch and
perm_e a permutation seeded by (seed, e); positions map to ranks and micro-steps exactly as for
PackedLoader (trainer/data/loader.py), so a step's examples do not depend on the layout and
resume is exact at any dp_size or micro_batch_size.
"""

import logging
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from safetensors import safe_open

from rundir.errors import DataError
from .loader import PrefetchingLoader, check_batch_layout
from .meta import data_format, load_meta
from .sft_prepare import EXAMPLES_FILE

logger = logging.getLogger(__name__)

__all__ = ["SFTExamples", "SFTLoader", "fixed_sft_eval_batches", "data_format"]


class SFTExamples:
    """The examples of one split directory (e.g. DIR/train), memory-mapped; reads copy only what they ask for."""

    def __init__(self, split_dir: Union[str, Path], seq_len: Optional[int] = None):
        self.path = Path(split_dir)
        self.meta = load_meta(self.path)
        if "split" not in self.meta:
            raise DataError(f"{self.path} is a prepared directory, not a split; use {self.path / 'train'}")
        if data_format(self.path) != "sft":
            raise DataError(f"{self.path} holds pretraining token shards, not SFT examples; prepare SFT data with "
                            "`python -m trainer.data prepare --format sft`, or train it as pretraining data")
        self.seq_len = int(self.meta["seq_len"])
        if seq_len is not None and seq_len != self.seq_len:
            raise DataError(f"train.seq_len={seq_len} but {self.path} was prepared with seq_len={self.seq_len}: "
                            f"re-run prepare --seq-len {seq_len} or set train.seq_len={self.seq_len}")
        file = self.path / self.meta.get("file", EXAMPLES_FILE)
        if not file.is_file():
            raise DataError(f"{file} is missing: the prepared SFT split is damaged; re-run prepare")
        try:
            self._file = safe_open(str(file), framework="np")
            self._tokens = self._file.get_slice("tokens")
            self.prompt_len = self._file.get_tensor("prompt_len").astype(np.int64)
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise DataError(f"{file} is not a readable SFT examples file ({exc}); re-run prepare") from exc
        self.num_examples = len(self.prompt_len)
        shape = tuple(self._tokens.get_shape())
        if shape != (self.num_examples, self.seq_len) or self.num_examples != self.meta["num_examples"]:
            raise DataError(f"{file}: tokens {list(shape)} and prompt_len [{self.num_examples}] do not match "
                            f"meta.json (num_examples={self.meta['num_examples']}, seq_len={self.seq_len}); re-run prepare")
        if self.num_examples and not (0 <= self.prompt_len.min() and self.prompt_len.max() < self.seq_len):
            raise DataError(f"{file}: prompt_len outside [0, {self.seq_len}); re-run prepare")

    def __len__(self) -> int:
        return self.num_examples

    def read(self, indices) -> Tuple[torch.Tensor, torch.Tensor]:
        """(tokens int64 [n, seq_len], prompt_mask bool [n, seq_len]) of the examples at `indices`."""
        indices = [int(i) for i in indices]
        if any(not 0 <= i < self.num_examples for i in indices):
            raise IndexError(f"example indices {indices} outside [0, {self.num_examples})")
        # get_slice takes plain slices only, so rows are read one by one (a micro-batch is a few rows).
        rows = [self._tokens[i: i + 1] for i in indices]
        tokens = np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, self.seq_len), np.int64)
        prompt_mask = np.arange(self.seq_len)[None, :] < self.prompt_len[indices][:, None]
        return torch.from_numpy(tokens), torch.from_numpy(prompt_mask)


class _ShuffledExamples:
    """Position p -> example perm_e[p mod N]; one epoch's permutation cached, since positions
    are consumed in increasing order (the cache misses only at an epoch boundary)."""

    def __init__(self, examples: SFTExamples, seed: int):
        self.examples, self.seed = examples, seed
        self._cached: Optional[Tuple[int, np.ndarray]] = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.examples.num_examples))
        return self._cached[1]

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.examples.num_examples)
        return int(self.permutation(epoch)[offset])


def _sft_rows(shuffled: _ShuffledExamples, positions: np.ndarray) -> Dict[str, torch.Tensor]:
    tokens, prompt_mask = shuffled.examples.read([shuffled.index_at(p) for p in positions])
    return {"tokens": tokens, "prompt_mask": prompt_mask}


class SFTLoader(PrefetchingLoader):
    """SFT micro-batches for one data-parallel rank: tokens and prompt_mask, shuffled per epoch.

    The interface, the layout rule and the resume state are PackedLoader's (PrefetchingLoader);
    consumed_sequences counts examples.
    """

    def __init__(
        self,
        split_dir: Union[str, Path],
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        prefetch: int = 2,
    ):
        check_batch_layout(global_batch_size, micro_batch_size, dp_rank, dp_size, prefetch)
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.examples = SFTExamples(split_dir, seq_len)
        if self.examples.num_examples == 0:
            raise DataError(f"{self.examples.path} holds no examples (all were dropped as too long?); "
                            "re-run prepare with a larger --seq-len or more data")
        self._shuffled = _ShuffledExamples(self.examples, seed)
        super().__init__(partial(_sft_rows, self._shuffled), seq_len, global_batch_size, micro_batch_size,
                         dp_rank, dp_size, seed, prefetch)

    @property
    def num_examples(self) -> int:
        return self.examples.num_examples

    def permutation(self, epoch: int) -> np.ndarray:
        """The example order of an epoch."""
        return self._shuffled.permutation(epoch)


def fixed_sft_eval_batches(
    split_dir: Union[str, Path], seq_len: int, batch_size: int, num_batches: int
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The first examples of a split, in file order, as (tokens int64 [b, L], prompt_mask bool [b, L]) batches.

    No shuffling and no dependence on the training seed, so validation numbers are comparable
    across runs. If the split is too small, fewer batches are returned (with a warning); none
    at all is an error.
    """
    if batch_size <= 0 or num_batches <= 0:
        raise ValueError(f"batch_size and num_batches must be positive, got {batch_size}, {num_batches}")
    examples = SFTExamples(split_dir, seq_len)
    available = examples.num_examples // batch_size
    if available == 0:
        raise DataError(f"{examples.path} holds {examples.num_examples} examples, fewer than one eval batch "
                        f"of {batch_size}")
    if available < num_batches:
        logger.warning("%s holds only %d eval batches of %d examples; using those instead of %d",
                       examples.path, available, batch_size, num_batches)
    return [examples.read(range(b * batch_size, (b + 1) * batch_size)) for b in range(min(available, num_batches))]
