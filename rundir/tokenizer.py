"""Reading a tokenizer file (sentencepiece model or Hugging Face tokenizer.json) with the special ids
ecdlm needs, and the run-level Tokenizer the tools use. Training a tokenizer is the data
pipeline's job (trainer/data/tokenizer.py); reading one is everyone's, so it lives here.

    tok = data_tokenizer("data/default")   # <data.path>/tokenizer.model (or tokenizer.json)
    ids = tok.encode("def f(x):")          # no special tokens added
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import sentencepiece as spm

from .errors import DataError
from .state import resolve_path

MASK_PIECE = "<|mask|>"   # the mask token every ecdlm tokenizer carries


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    pad_id: int
    unk_id: int
    eod_id: int
    mask_id: int
    sha256: str


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


@dataclass
class Tokenizer:
    """The run's tokenizer with the ids the tools need; encode adds no special tokens."""
    sp: object
    pad_id: int
    eod_id: int
    mask_id: int
    vocab_size: int

    def encode(self, text: str) -> list:
        return list(self.sp.encode(text))

    def decode(self, ids) -> str:
        """Text of `ids` up to the first end-of-document or pad token (the sampler fills a fixed
        length; what follows the document's end is not part of the answer)."""
        out = []
        for i in (int(t) for t in ids):
            if i in (self.eod_id, self.pad_id):
                break
            if i != self.mask_id:
                out.append(i)
        return self.sp.decode(out)


def data_tokenizer(data_path: str) -> Tokenizer:
    """The tokenizer of a prepared data directory: tokenizer.model, else tokenizer.json (HF)."""
    folder = resolve_path(data_path)
    name = "tokenizer.model" if os.path.exists(os.path.join(folder, "tokenizer.model")) or \
        not os.path.exists(os.path.join(folder, "tokenizer.json")) else "tokenizer.json"
    sp, info = load_tokenizer(os.path.join(folder, name))
    return Tokenizer(sp, info.pad_id, info.eod_id, info.mask_id, info.vocab_size)
