"""Training the sentencepiece tokenizer, plus the worker-side encoder (reading one: rundir/tokenizer.py)."""

import io
import re
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np
import sentencepiece as spm

from rundir.errors import DataError
from rundir.tokenizer import MASK_PIECE, TokenizerInfo, load_tokenizer

# The ids ecdlm's own tokenizers are trained with (a given tokenizer may use others: see meta.json).
PAD_ID = 0
UNK_ID = 1
EOD_ID = 2  # sentencepiece's eos; marks the end of every document in the token stream
MASK_ID = 3  # the control piece MASK_PIECE, added first

# sentencepiece drops training "sentences" longer than max_sentence_length, so whole
# documents are cut into line-aligned pieces; keeping several lines together lets it
# learn pieces that contain newlines (e.g. "):\n"), which matter a lot for code.
_TRAIN_PIECE_CHARS = 4096
_MAX_SENTENCE_BYTES = 4 * _TRAIN_PIECE_CHARS  # UTF-8 uses at most 4 bytes per character


def _training_pieces(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        buf: List[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            # A single huge line (minified data, base64) is hard-cut rather than lost.
            while len(line) > _TRAIN_PIECE_CHARS:
                yield line[:_TRAIN_PIECE_CHARS]
                line = line[_TRAIN_PIECE_CHARS:]
            if size + len(line) > _TRAIN_PIECE_CHARS and buf:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += len(line)
        if buf:
            yield "".join(buf)


def train_tokenizer(texts: List[str], vocab_size: int, model_type: str, num_threads: int) -> bytes:
    """Train a sentencepiece model on `texts` and return the serialized model."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_pieces(texts),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            eos_id=EOD_ID,
            bos_id=-1,
            # A control symbol (not a user-defined one) so that a document that literally
            # contains "<|mask|>" can never put the mask id into the training data.
            control_symbols=[MASK_PIECE],
            byte_fallback=True,
            # Exact round trip of the text: no NFKC, no whitespace folding (code indentation).
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            # The caller already chose the sample; 0 = use all of it, no random subsampling.
            input_sentence_size=0,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        limit = re.search(r"value <= (\d+)", str(exc))
        size = sum(len(t.encode("utf-8")) for t in texts)
        hint = (
            f"lower --vocab-size to at most {limit.group(1)} or give more text"
            if limit
            else "check --vocab-size and the corpus"
        )
        raise DataError(
            f"sentencepiece could not train a vocab_size={vocab_size} {model_type} tokenizer "
            f"on {len(texts)} documents ({size} bytes): {exc}; {hint}"
        ) from exc
    return model.getvalue()


def token_dtype(vocab_size: int) -> np.dtype:
    # Fixed little-endian so shards written on one machine read the same on any other.
    return np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<u4")


# --- worker side: each process loads the model once, then encodes chunks of documents ---

_worker: Optional[Tuple[spm.SentencePieceProcessor, TokenizerInfo, np.dtype]] = None


def init_worker(model_path: str) -> None:
    global _worker
    sp, info = load_tokenizer(model_path)
    _worker = (sp, info, token_dtype(info.vocab_size))


def encode_chunk(texts: List[str]) -> Tuple[np.ndarray, np.ndarray, int]:
    """Encode documents; returns (tokens with one EOD after each document,
    per-document token counts including the EOD, number of mask ids produced)."""
    assert _worker is not None, "init_worker() was not called in this process"
    sp, info, dtype = _worker
    # One thread per worker: the parallelism comes from the process pool.
    encoded = sp.encode(texts, num_threads=1)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for ids in encoded:
        tokens[pos : pos + len(ids)] = ids
        pos += len(ids)
        tokens[pos] = info.eod_id
        pos += 1
    # Only a user-supplied tokenizer with a user-defined mask symbol can produce this.
    mask_hits = int(np.count_nonzero(tokens == info.mask_id))
    return tokens, lengths, mask_hits
