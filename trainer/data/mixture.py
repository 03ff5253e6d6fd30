"""Data mixtures: several prepared directories blended by weight into every global batch.

The blending rule (docs/data.md). With normalized weights w_i and global batch size G, source i
gets q_i = floor(w_i * G) sequences of every batch, and the R = G - sum_i q_i left over go one
each to the R sources furthest behind their target: the deficit of source i before batch s is
frac(w_i * G) * (s + 1) minus the extras it has had in batches 0..s-1; ties go by a rotation
(i - s - seed) mod K. So every batch holds floor(w_i G) or ceil(w_i G) sequences of source i
(within one of its share), and over many batches the counts follow the weights exactly, not
the rounded shares. The counts depend only on the step, never on the ranks.

Within a batch the sources are interleaved: the k-th of c_i sequences of source i sits at key
(k + 0.5) / c_i, slots ordered by key (then source), so each rank's micro-batches see the mix too.
Source i reads its own stream in order: its n-th sequence overall is position n of the source's
own seeded shuffle (PackedSequences or the SFT examples' permutation), epoch after epoch, each
epoch a new permutation. Global position s*G + j therefore maps to (source, stream position) as
a pure function of s, j and the cumulative counts, which the resume state carries.
"""

import logging
import math
import os
import threading
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from rundir.config import mixture_name   # the one place a default name is derived
from rundir.errors import DataError

from .loader import PrefetchingLoader, check_batch_layout
from .meta import check_vocab, data_format, load_meta
from .packing import PackedSequences
from .tokens import TokenStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    name: str
    path: str
    weight: float        # normalized: the weights of a mixture sum to 1
    raw_weight: float    # as configured


def resolve_sources(entries: Sequence) -> List[Source]:
    """Config entries ({path, weight, name}) -> Sources with normalized weights."""
    total = math.fsum(e.weight for e in entries)
    return [Source(mixture_name(e), e.path, e.weight / total, e.weight) for e in entries]


def normalization_note(sources: Sequence[Source]) -> Optional[str]:
    total = math.fsum(s.raw_weight for s in sources)
    if abs(total - 1.0) <= 1e-9:
        return None
    shares = ", ".join(f"{s.name} {s.weight:.4g}" for s in sources)
    return f"data.mixture weights sum to {total:g}, not 1: normalized to {shares}"


def check_sources(sources: Sequence[Source], vocab_size: int, pad_id: int, mask_id: int) -> str:
    """Refuse a mixture that cannot train (before anything expensive); returns the data format
    ("pretrain" or "sft") all sources share. Errors name the source."""
    first, first_fmt, first_sha = None, None, None
    for i, src in enumerate(sources):
        for split in ("train", "val"):
            if not os.path.exists(os.path.join(src.path, split, "meta.json")):
                raise FileNotFoundError(
                    f"data.mixture[{i}] (source {src.name}): {src.path} has no prepared {split} split; run "
                    f"`python -m trainer.data prepare --out {src.path}` first")
        check_vocab(src.path, vocab_size, pad_id, mask_id, data_path=f"{src.path} (source {src.name})")
        fmt, sha = data_format(src.path), load_meta(src.path).get("tokenizer_sha256")
        if first is None:
            first, first_fmt, first_sha = src, fmt, sha
            continue
        if fmt != first_fmt:
            raise DataError(f"data.mixture: source {src.name} ({src.path}) holds {fmt} data but source "
                            f"{first.name} holds {first_fmt}; pretraining and SFT directories do not mix")
        if sha != first_sha:
            raise DataError(f"data.mixture: source {src.name} ({src.path}) was prepared with tokenizer sha256 "
                            f"{sha} but source {first.name} with {first_sha}; re-run prepare for {src.name} with "
                            f"--tokenizer {os.path.join(first.path, 'tokenizer.model')}")
    return first_fmt


def source_seed(seed: int, name: str) -> int:
    """Each source's own shuffle seed: from the run's seed and the source's name (not its place in
    the list, so reordering the mixture does not reshuffle a source)."""
    return (seed << 32) | zlib.crc32(name.encode())


class MixturePlan:
    """Per-source counts of every global batch (the rule in the module docstring). Counts are
    built step by step from a known point (step 0, or a checkpoint's cumulative counts); the
    prefetch thread extends them, the main thread reads them, hence the lock."""

    def __init__(self, weights: Sequence[float], global_batch_size: int, seed: int):
        w = np.asarray(weights, dtype=np.float64)
        self.K, self.G, self.seed = len(w), global_batch_size, seed
        quota = w * global_batch_size
        self.base = np.floor(quota + 1e-9).astype(np.int64)
        self.frac = np.clip(quota - self.base, 0.0, None)
        self.extra = int(global_batch_size - self.base.sum())
        self._lock = threading.Lock()
        self.reset(0, np.zeros(self.K, dtype=np.int64))

    def reset(self, step: int, consumed: Sequence[int]) -> None:
        """Start from `consumed[i]` sequences of source i before `step`."""
        with self._lock:
            self._first = step
            self._cum = np.zeros((64, self.K), dtype=np.int64)
            self._cum[0] = consumed
            self._n = 1   # rows hold the cumulative counts before steps first .. first + n - 1
            self._slots = None

    def _extend(self, step: int) -> None:
        while self._first + self._n - 1 < step:
            s = self._first + self._n - 1
            cum = self._cum[self._n - 1]
            counts = self.base.copy()
            if self.extra:
                deficit = self.frac * (s + 1) - (cum - self.base * s)
                order = sorted(range(self.K), key=lambda i: (-round(float(deficit[i]), 9),
                                                             (i - s - self.seed) % self.K))
                counts[order[:self.extra]] += 1
            if self._n == len(self._cum):
                self._cum = np.concatenate([self._cum, np.zeros_like(self._cum)])
            self._cum[self._n] = cum + counts
            self._n += 1

    def consumed(self, step: int) -> np.ndarray:
        """Sequences of each source in global batches before `step` (int64 [K])."""
        with self._lock:
            if step < self._first:
                raise ValueError(f"step {step} precedes the plan's start {self._first}")
            self._extend(step)
            return self._cum[step - self._first].copy()

    def counts(self, step: int) -> np.ndarray:
        """Sequences of each source in global batch `step` (int64 [K], summing to G)."""
        return self.consumed(step + 1) - self.consumed(step)

    def slots(self, step: int) -> tuple:
        """(source int64 [G], stream position int64 [G]) of each slot of global batch `step`;
        the last step's are kept (a step's micro-batches ask one after another)."""
        cached = self._slots
        if cached is not None and cached[0] == step:
            return cached[1]
        start, counts = self.consumed(step), self.counts(step)
        src = np.repeat(np.arange(self.K), counts)
        k = np.concatenate([np.arange(c) for c in counts])
        key = (k + 0.5) / counts[src]
        order = np.lexsort((src, key))
        src, k = src[order], k[order]
        self._slots = (step, (src, start[src] + k))
        return self._slots[1]


class _PackedReader:
    def __init__(self, split_dir, seq_len: int, seed: int):
        self.sequences = PackedSequences(TokenStore(split_dir), seq_len, seed)
        self.num = self.sequences.num_sequences

    def rows(self, positions: np.ndarray) -> Dict[str, np.ndarray]:
        return {"tokens": self.sequences.batch(positions.tolist())}


class _SFTReader:
    def __init__(self, split_dir, seq_len: int, seed: int):
        from .sft_loader import SFTExamples, _ShuffledExamples
        examples = SFTExamples(split_dir, seq_len)
        if examples.num_examples == 0:
            raise DataError(f"{examples.path} holds no examples; re-run prepare with a larger --seq-len or more data")
        self.shuffled, self.num = _ShuffledExamples(examples, seed), examples.num_examples

    def rows(self, positions: np.ndarray) -> Dict[str, np.ndarray]:
        tokens, prompt_mask = self.shuffled.examples.read([self.shuffled.index_at(p) for p in positions])
        return {"tokens": tokens.numpy(), "prompt_mask": prompt_mask.numpy()}


def _mixture_rows(plan: MixturePlan, readers: list, global_batch_size: int,
                  positions: np.ndarray) -> Dict[str, torch.Tensor]:
    step = int(positions[0]) // global_batch_size
    src_G, pos_G = plan.slots(step)
    j = positions - step * global_batch_size
    src, pos = src_G[j], pos_G[j]
    # assembled in numpy: a torch index_put may wake the intra-op thread pool, which on a busy
    # host stalls for milliseconds (the prefetch thread should not compete with the step for it)
    out: Dict[str, np.ndarray] = {}
    for i in np.unique(src):
        rows = np.nonzero(src == i)[0]
        for key, value in readers[i].rows(pos[rows]).items():
            if key not in out:
                out[key] = np.empty((len(positions), *value.shape[1:]), dtype=value.dtype)
            out[key][rows] = value
    out["source_ids"] = src.astype(np.int64)
    return {key: torch.from_numpy(value) for key, value in out.items()}


class MixtureLoader(PrefetchingLoader):
    """Micro-batches blended from several prepared sources (all pretraining, or all SFT).

    The layout rule and interface are PrefetchingLoader's, so global batches do not depend on
    dp_size or micro_batch_size; every MicroBatch also carries `source_ids` (int64 [micro]),
    the index in `sources` of each row. The resume state adds each source's consumed count.
    """

    def __init__(self, sources: Sequence[Source], split: str, mode: str, seq_len: int, global_batch_size: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, seed: int, prefetch: int = 2):
        check_batch_layout(global_batch_size, micro_batch_size, dp_rank, dp_size, prefetch)
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.sources = list(sources)
        Reader = _SFTReader if mode == "sft" else _PackedReader
        self.readers = [Reader(Path(s.path) / split, seq_len, source_seed(seed, s.name)) for s in self.sources]
        self.plan = MixturePlan([s.weight for s in self.sources], global_batch_size, seed)
        super().__init__(partial(_mixture_rows, self.plan, self.readers, global_batch_size), seq_len,
                         global_batch_size, micro_batch_size, dp_rank, dp_size, seed, prefetch)

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.sources]

    def consumed(self, step: Optional[int] = None) -> Dict[str, int]:
        """Sequences of each source in the global batches before `step` (default: the next step)."""
        counts = self.plan.consumed(self.step if step is None else step)
        return {s.name: int(c) for s, c in zip(self.sources, counts)}

    def accounting(self, step: int) -> Dict[str, float]:
        """Metrics of the data read before `step`: sequences, tokens and epochs (fractional) per source."""
        row = {}
        for src, reader, (name, n) in zip(self.sources, self.readers, self.consumed(step).items()):
            row[f"data/sequences/{name}"] = n
            row[f"data/tokens/{name}"] = n * self.seq_len
            row[f"data/epochs/{name}"] = n / reader.num
        return row

    def new_epochs(self, before: int, after: int) -> List[str]:
        """One line per source that started a new epoch (a new shuffle) in steps [before, after)."""
        lines = []
        c0, c1 = self.plan.consumed(before), self.plan.consumed(after)
        for src, reader, a, b in zip(self.sources, self.readers, c0, c1):
            first_new = a // reader.num + (a % reader.num > 0)   # the first epoch that begins at or after a
            for epoch in range(max(first_new, 1), (b - 1) // reader.num + 1 if b else 0):
                lines.append(f"data: source {src.name} ran out after {epoch * reader.num} sequences "
                             f"({epoch} epoch{'s' if epoch > 1 else ''} of {reader.num}); epoch {epoch + 1} "
                             f"starts with a new shuffle")
        return lines

    def state_dict(self) -> Dict:
        state = super().state_dict()
        state["mixture"] = {"names": self.names, "weights": [s.weight for s in self.sources],
                            "consumed": [int(c) for c in self.plan.consumed(self.step)]}
        return state

    def load_state_dict(self, state: Dict) -> None:
        saved = state.get("mixture")
        if saved is None:
            raise DataError("cannot resume: the checkpoint was written by a single-source run (data.path), "
                            "this run reads data.mixture; start a new run (train.resume=never)")
        if saved["names"] != self.names or any(abs(a - s.weight) > 1e-12
                                               for a, s in zip(saved["weights"], self.sources)):
            was = ", ".join(f"{n} {w:.4g}" for n, w in zip(saved["names"], saved["weights"]))
            now = ", ".join(f"{s.name} {s.weight:.4g}" for s in self.sources)
            raise DataError(f"cannot resume: data.mixture was [{was}] when saved, now [{now}]; the per-source "
                            f"positions belong to the saved mixture (start a new run, or restore it)")
        super().load_state_dict(state)
        self.plan.reset(self.step, saved["consumed"])


def fixed_source_eval_batches(sources: Sequence[Source], mode: str, seq_len: int, batch_size: int,
                              num_batches: int) -> Dict[str, list]:
    """Each source's own fixed validation batches (its val split's prefix, as for one source)."""
    from .loader import fixed_eval_batches
    from .sft_loader import fixed_sft_eval_batches
    make = fixed_sft_eval_batches if mode == "sft" else fixed_eval_batches
    return {s.name: make(os.path.join(s.path, "val"), seq_len, batch_size, num_batches) for s in sources}
