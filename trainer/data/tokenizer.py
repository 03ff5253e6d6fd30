"""Training, loading and validating the sentencepiece tokenizer, plus the worker-side encoder."""

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np
import sentencepiece as spm

from .errors import DataError

PAD_ID = 0
UNK_ID = 1
EOD_ID = 2  # sentencepiece's eos; marks the end of every document in the token stream
MASK_PIECE = "<|mask|>"
MASK_ID = 3

# sentencepiece drops training "sentences" longer than max_sentence_length, so whole
# documents are cut into line-aligned pieces; keeping several lines together lets it
# learn pieces that contain newlines (e.g. "):\n"), which matter a lot for code.
_TRAIN_PIECE_CHARS = 4096
_MAX_SENTENCE_BYTES = 4 * _TRAIN_PIECE_CHARS  # UTF-8 uses at most 4 bytes per character


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    pad_id: int
    unk_id: int
    eod_id: int
    mask_id: int
    sha256: str


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


def load_tokenizer(path_or_bytes) -> Tuple[spm.SentencePieceProcessor, TokenizerInfo]:
    """Load a model and read its special ids; pad, eos and the mask piece must exist."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        blob, where = bytes(path_or_bytes), "trained tokenizer"
    else:
        where = str(path_or_bytes)
        try:
            blob = Path(path_or_bytes).read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read tokenizer {where}: {exc}") from exc
    if blob.lstrip()[:1] == b"{":   # a Hugging Face tokenizer.json (whatever the file is called)
        return load_hf_tokenizer(blob, where)
    sp = spm.SentencePieceProcessor()
    try:
        sp.load_from_serialized_proto(blob)
    except RuntimeError as exc:
        raise DataError(f"{where} is not a sentencepiece model: {exc}") from exc
    mask_id = sp.piece_to_id(MASK_PIECE)
    missing = []
    if sp.pad_id() < 0:
        missing.append("a pad piece (train with pad_id >= 0)")
    if sp.eos_id() < 0:
        missing.append("an eos piece (used as end-of-document; train with eos_id >= 0)")
    if sp.id_to_piece(mask_id) != MASK_PIECE:
        missing.append(f"the {MASK_PIECE!r} piece (add it as a control or user-defined symbol)")
    if missing:
        raise DataError(f"tokenizer {where} lacks " + " and ".join(missing))
    info = TokenizerInfo(
        vocab_size=sp.get_piece_size(),
        pad_id=sp.pad_id(),
        unk_id=sp.unk_id(),
        eod_id=sp.eos_id(),
        mask_id=mask_id,
        sha256=hashlib.sha256(blob).hexdigest(),
    )
    return sp, info


# --- Hugging Face tokenizer.json (through the `tokenizers` library) ---------------------------
# The file alone must say which tokens are pad and end-of-document: `prepare` copies just this file
# into the data directory. Special tokens are recognised by these conventional names.
EOD_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")


class HFTokenizer:
    """A `tokenizers` Tokenizer behind the sentencepiece calls the data pipeline and the evaluation
    tools make. Encoding adds no special tokens, as ecdlm's sentencepiece model adds none."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text, num_threads=None):
        if isinstance(text, str):
            return self.tok.encode(text, add_special_tokens=False).ids
        return [e.ids for e in self.tok.encode_batch(list(text), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def get_piece_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


def load_hf_tokenizer(blob: bytes, where: str, mask_token: str = MASK_PIECE) -> Tuple[HFTokenizer, TokenizerInfo]:
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_str(blob.decode("utf-8"))
    except Exception as exc:   # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"{where} is not a Hugging Face tokenizer.json: {exc}") from exc
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    padding = tok.padding["pad_token"] if tok.padding else None

    def first(names):
        return next((tok.token_to_id(n) for n in names if n in special or n == padding), None)
    pad_id, eod_id, mask_id = first((padding,) if padding else PAD_NAMES), first(EOD_NAMES), tok.token_to_id(mask_token)
    missing = [what for what, i in (("a pad token (one of " + ", ".join(PAD_NAMES) + ")", pad_id),
                                    ("an end-of-document token (one of " + ", ".join(EOD_NAMES) + ")", eod_id),
                                    (f"the mask token {mask_token!r}", mask_id)) if i is None]
    if missing:
        raise DataError(f"tokenizer {where} lacks " + " and ".join(missing) + " among its special tokens")
    unk = tok.token_to_id("<unk>")
    info = TokenizerInfo(vocab_size=tok.get_vocab_size(with_added_tokens=True), pad_id=pad_id,
                         unk_id=-1 if unk is None else unk, eod_id=eod_id, mask_id=mask_id,
                         sha256=hashlib.sha256(blob).hexdigest())
    return HFTokenizer(tok), info


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
