"""Fixed-length sequences cut from a token stream, and their seeded order per epoch."""

from typing import Optional, Sequence, Tuple

import numpy as np

from rundir.errors import DataError
from .tokens import TokenStore


class PackedSequences:
    """Sequence i is tokens [i*seq_len, (i+1)*seq_len) of the stream; the tail is dropped.

    Documents are packed back to back (separated by EOD) without padding, so no compute
    is spent on pad tokens; a sequence may start or end mid-document.

    The order is a pure function of (seed, global position): position p reads sequence
    permutation(seed, p // n)[p % n]. Any rank can compute any position without talking
    to the others, which is what makes batches independent of the data-parallel layout
    and resume exact.
    """

    def __init__(self, store: TokenStore, seq_len: int, seed: int):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.store, self.seq_len, self.seed = store, seq_len, seed
        self.num_sequences = store.num_tokens // seq_len
        if self.num_sequences == 0:
            raise DataError(
                f"{store.path} holds {store.num_tokens} tokens, fewer than one sequence of seq_len={seq_len}"
            )
        self._cached: Optional[Tuple[int, np.ndarray]] = None

    def sequence(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence {index} outside [0, {self.num_sequences})")
        return self.store.read(index * self.seq_len, (index + 1) * self.seq_len)

    def permutation(self, epoch: int) -> np.ndarray:
        # One epoch cached: positions are consumed in increasing order, so the cache
        # misses only at an epoch boundary.
        if self._cached is None or self._cached[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            self._cached = (epoch, order)
        return self._cached[1]

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_sequences)
        return int(self.permutation(epoch)[offset])

    def batch(self, positions: Sequence[int]) -> np.ndarray:
        """Sequences at the given global positions, as an int64 [len(positions), seq_len] array."""
        out = np.empty((len(positions), self.seq_len), dtype=np.int64)
        for row, position in enumerate(positions):
            out[row] = self.sequence(self.index_at(position))
        return out
