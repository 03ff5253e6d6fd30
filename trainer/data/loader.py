"""Training-side loading: packed micro-batches per data-parallel rank, prefetched, resumable.

`PrefetchingLoader` is the machinery every loader shares (the global-position layout, the
prefetch thread, resume state); `PackedLoader` feeds it packed pretraining sequences and
`trainer.data.sft_loader.SFTLoader` fine-tuning examples.
"""

import logging
import queue
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch

from rundir.errors import DataError
from .meta import FORMAT_VERSION
from .packing import PackedSequences
from .tokens import TokenStore

logger = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # int64 [micro_batch_size, seq_len]
    # Position of each row within its optimizer step's global batch, in [0, global_batch_size):
    # lets the trainer slice per-sequence noise drawn once for the whole global batch.
    global_offsets: torch.Tensor  # int64 [micro_batch_size]
    step: int
    micro_step: int
    # SFT only: bool [micro_batch_size, seq_len], True at prompt positions (never masked, no loss)
    prompt_mask: Optional[torch.Tensor] = None
    # data mixtures only: int64 [micro_batch_size], each row's source (trainer/data/mixture.py)
    source_ids: Optional[torch.Tensor] = None


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


# Global positions -> the MicroBatch fields that depend on the data: {"tokens": ..., ...}.
RowsFn = Callable[[np.ndarray], Dict[str, torch.Tensor]]


@dataclass(frozen=True)
class _Layout:
    """Everything needed to build micro-batches; what the prefetch thread holds instead of
    the loader itself, so an unreferenced loader can be collected (and its thread stopped)."""

    rows: RowsFn
    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    grad_accum_steps: int

    def positions(self, step: int, micro_step: int) -> np.ndarray:
        first = step * self.global_batch_size + (micro_step * self.dp_size + self.dp_rank) * self.micro_batch_size
        return np.arange(first, first + self.micro_batch_size, dtype=np.int64)

    def build(self, step: int, micro_step: int) -> MicroBatch:
        positions = self.positions(step, micro_step)
        return MicroBatch(
            **self.rows(positions),
            global_offsets=torch.from_numpy(positions - step * self.global_batch_size),
            step=step,
            micro_step=micro_step,
        )


def _produce(layout: _Layout, step: int, micro_step: int, out: queue.Queue, stop: threading.Event) -> None:
    def put(item) -> bool:
        # Timed puts so that close() is noticed even while the queue is full.
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        while put(layout.build(step, micro_step)):
            micro_step += 1
            if micro_step == layout.grad_accum_steps:
                step, micro_step = step + 1, 0
    except BaseException as exc:  # handed to the consumer, which re-raises it
        put(_Failed(exc))


def check_batch_layout(global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                       prefetch: int) -> None:
    """Raise ValueError unless the sizes make whole micro-batches on every rank."""
    if micro_batch_size <= 0 or dp_size <= 0 or global_batch_size <= 0:
        raise ValueError(
            f"batch sizes must be positive: global_batch_size={global_batch_size}, "
            f"micro_batch_size={micro_batch_size}, dp_size={dp_size}"
        )
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"global_batch_size={global_batch_size} is not a multiple of "
            f"micro_batch_size={micro_batch_size} * dp_size={dp_size}"
        )
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} outside [0, dp_size={dp_size})")
    if prefetch < 1:
        raise ValueError(f"prefetch must be at least 1, got {prefetch}")


class PrefetchingLoader:
    """Micro-batches for one data-parallel rank, built ahead by a thread.

    Optimizer step s covers global positions [s*G, (s+1)*G); micro-step m on rank r takes
    the `micro_batch_size` positions starting at s*G + (m*dp_size + r)*micro_batch_size.
    The union over ranks and micro-steps is therefore the same set of sequences whatever
    dp_size and micro_batch_size are, so the global batch (and the loss) does not depend
    on the layout, and a checkpoint can be resumed on a different number of ranks.
    What a position holds is the subclass's business: it hands over `rows`, which must
    be a pure function of the position and must not refer to the loader.
    """

    def __init__(
        self,
        rows: RowsFn,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        prefetch: int,
    ):
        self.seq_len, self.seed = seq_len, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.grad_accum_steps = global_batch_size // (micro_batch_size * dp_size)
        self.prefetch = prefetch
        self._layout = _Layout(rows, global_batch_size, micro_batch_size, dp_rank, dp_size, self.grad_accum_steps)
        self.wait_seconds = 0.0  # time next_micro_batch() spent blocked on the prefetch queue
        self._step = 0
        self._micro_step = 0
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._stop: Optional[threading.Event] = None

    @property
    def step(self) -> int:
        """The optimizer step the next micro-batch belongs to."""
        return self._step

    @property
    def micro_step(self) -> int:
        return self._micro_step

    def positions(self, step: int, micro_step: int) -> np.ndarray:
        """Global sequence positions of this rank's micro-batch."""
        return self._layout.positions(step, micro_step)

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        # daemon: a trainer that forgets close() must still be able to exit.
        self._thread = threading.Thread(
            target=_produce,
            args=(self._layout, self._step, self._micro_step, self._queue, self._stop),
            name=f"{type(self).__name__}-rank{self.dp_rank}",
            daemon=True,
        )
        self._thread.start()

    def next_micro_batch(self) -> MicroBatch:
        if self._thread is None:
            self._start()
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - start
        if isinstance(item, _Failed):
            self.close()
            if isinstance(item.error, DataError):   # damaged data: the user's to fix, named as it is
                raise item.error
            raise RuntimeError("the data prefetch thread failed") from item.error
        assert (item.step, item.micro_step) == (self._step, self._micro_step)
        self._micro_step += 1
        if self._micro_step == self.grad_accum_steps:
            self._step, self._micro_step = self._step + 1, 0
        return item

    def close(self) -> None:
        """Stop the prefetch thread; the loader can still be used (it restarts lazily)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = self._queue = self._stop = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def state_dict(self) -> Dict:
        """Resume state; defined only between optimizer steps (where checkpoints are taken)."""
        if self._micro_step != 0:
            raise RuntimeError(
                f"state_dict() called in the middle of step {self._step} "
                f"(micro-step {self._micro_step} of {self.grad_accum_steps}); save between optimizer steps"
            )
        return {
            "consumed_sequences": self._step * self.global_batch_size,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "format_version": FORMAT_VERSION,
        }

    def load_state_dict(self, state: Dict) -> None:
        """Continue from a saved position. dp_size and micro_batch_size may differ from the
        saving run (positions are global); seed, seq_len and global batch size may not."""
        if "mixture" in state and type(self).load_state_dict is PrefetchingLoader.load_state_dict:
            raise DataError(f"cannot resume: the checkpoint was written by a data.mixture run "
                            f"({', '.join(state['mixture']['names'])}), this run reads one source (data.path); "
                            f"start a new run (train.resume=never) or restore data.mixture")
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"loader state has format_version={state.get('format_version')}, expected {FORMAT_VERSION}")
        for field in ("seed", "seq_len", "global_batch_size"):
            if state[field] != getattr(self, field):
                raise ValueError(
                    f"cannot resume the data loader: {field} was {state[field]} when saved, "
                    f"now {getattr(self, field)}"
                )
        consumed = int(state["consumed_sequences"])
        if consumed < 0 or consumed % self.global_batch_size:
            raise ValueError(
                f"consumed_sequences={consumed} is not a whole number of global batches of {self.global_batch_size}"
            )
        self.close()  # whatever was prefetched belongs to the old position
        self._step, self._micro_step = consumed // self.global_batch_size, 0


def _packed_rows(sequences: PackedSequences, positions: np.ndarray) -> Dict[str, torch.Tensor]:
    return {"tokens": torch.from_numpy(sequences.batch(positions.tolist()))}


class PackedLoader(PrefetchingLoader):
    """Packed pretraining sequences (see PackedSequences for what position p holds)."""

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
        self.sequences = PackedSequences(TokenStore(split_dir), seq_len, seed)
        super().__init__(partial(_packed_rows, self.sequences), seq_len, global_batch_size, micro_batch_size,
                         dp_rank, dp_size, seed, prefetch)

    @property
    def num_sequences(self) -> int:
        return self.sequences.num_sequences


def fixed_eval_batches(
    split_dir: Union[str, Path], seq_len: int, batch_size: int, num_batches: int
) -> List[torch.Tensor]:
    """The first sequences of a split, in stream order, as int64 [batch_size, seq_len] batches.

    No shuffling and no dependence on the training seed, so validation numbers are
    comparable across runs. If the split is too small, fewer batches are returned (with
    a warning); none at all is an error.
    """
    if batch_size <= 0 or num_batches <= 0:
        raise ValueError(f"batch_size and num_batches must be positive, got {batch_size}, {num_batches}")
    store = TokenStore(split_dir)
    available = store.num_tokens // seq_len // batch_size
    if available == 0:
        raise DataError(
            f"{store.path} holds {store.num_tokens} tokens, fewer than one eval batch of "
            f"{batch_size} x {seq_len}"
        )
    if available < num_batches:
        logger.warning(
            "%s holds only %d eval batches of %d x %d; using those instead of %d",
            store.path, available, batch_size, seq_len, num_batches,
        )
    batches = []
    for b in range(min(available, num_batches)):
        tokens = store.read(b * batch_size * seq_len, (b + 1) * batch_size * seq_len)
        batches.append(torch.from_numpy(tokens.astype(np.int64).reshape(batch_size, seq_len)))
    return batches
