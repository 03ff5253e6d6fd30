"""What both kinds of `prepare` share: the options, the train/val rule, the tokenizer (given or
trained on train text) and the atomic replacement of an output. `prepare.py` builds token shards
for pretraining, `sft_prepare.py` fixed-length examples for supervised fine-tuning."""

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional

from .corpus import Document
from rundir.errors import DataError
from rundir.tokenizer import TokenizerInfo, load_tokenizer

from .tokenizer import train_tokenizer

logger = logging.getLogger("trainer.data.prepare")

SPLITS = ("train", "val")
TOKENIZER_FILE = "tokenizer.model"
DEFAULT_VOCAB_SIZE = 4096


@dataclass
class PrepareConfig:
    out: str
    dataset: Optional[str] = None
    dataset_config: Optional[str] = None
    split: str = "train"
    files: Optional[List[str]] = None
    text_field: str = "text"
    max_docs: Optional[int] = None
    max_bytes: Optional[int] = None  # default: prepare.STDLIB_MAX_BYTES for the embedded corpus, else no cap
    val_fraction: float = 0.02
    vocab_size: Optional[int] = None  # default: DEFAULT_VOCAB_SIZE, or the given tokenizer's
    model_type: str = "bpe"
    tokenizer: Optional[str] = None
    tokenizer_sample_bytes: int = 32_000_000
    num_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    shard_tokens: int = 2**26
    # --format sft (see sft_prepare.py): fixed-length prompt/response examples instead of token shards.
    format: str = "pretrain"
    seq_len: Optional[int] = None
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    overwrite: bool = False   # replace a prepared dataset already in --out

    def validate(self) -> None:
        if self.dataset and self.files:
            raise DataError("give either --dataset or --files, not both")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("max_docs", "max_bytes", "vocab_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise DataError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.shard_tokens <= 0 or self.tokenizer_sample_bytes <= 0:
            raise DataError("--shard-tokens and --tokenizer-sample-bytes must be positive")
        if self.model_type not in ("bpe", "unigram"):
            raise DataError(f"--model-type must be bpe or unigram, got {self.model_type!r}")
        if self.format not in ("pretrain", "sft"):
            raise DataError(f"--format must be pretrain or sft, got {self.format!r}")
        if self.tokenizer and not os.path.exists(self.tokenizer):
            raise DataError(f"--tokenizer {self.tokenizer}: no such file (give a sentencepiece .model or a Hugging "
                            f"Face tokenizer.json)")
        if self.format == "pretrain" and self.seq_len is not None:
            raise DataError("--seq-len is for --format sft only: pretraining packs sequences at load time "
                            "(set train.seq_len)")


def check_out(cfg: "PrepareConfig") -> None:
    """--out must be new, or an empty directory, unless --overwrite: a prepared dataset (its
    shards and tokenizer) is never replaced without being asked, nor a folder of other files."""
    out = Path(cfg.out)
    if cfg.overwrite or not os.path.lexists(out):
        return
    if not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir() if p.name != ".prepare-tmp")
    if entries:
        what = "a prepared dataset" if "meta.json" in entries or "train" in entries else f"not empty ({entries[0]}, ...)"
        raise DataError(f"--out {out} is {what}; nothing was changed: choose a new directory, or add --overwrite "
                        f"to replace its train/, val/, tokenizer and meta.json")


def is_val(position: int, identity: str, val_fraction: float) -> bool:
    """Whether a document is held out: by a hash of its identity, so the split is stable
    under reordering and growth of the corpus. The first document always goes to val so
    that val is never empty, even for tiny corpora, without a second pass."""
    if position == 0:
        return True
    digest = hashlib.sha256(identity.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


def tokenizer_sample(docs: Iterable[Document], cfg: PrepareConfig) -> List[str]:
    """The first `tokenizer_sample_bytes` of train documents: never val text, so val
    numbers are not flattered by a tokenizer fitted to them."""
    texts: List[str] = []
    size = 0
    seen = 0
    for position, doc in enumerate(docs):
        seen += 1
        if is_val(position, doc.identity, cfg.val_fraction):
            continue
        texts.append(doc.text)
        size += len(doc.text.encode("utf-8"))
        if size >= cfg.tokenizer_sample_bytes:
            break
    if not texts:
        raise no_train_docs(seen)
    return texts


def no_train_docs(num_docs: int) -> DataError:
    if num_docs < 2:
        return DataError(
            f"the corpus has {num_docs} usable document(s); at least 2 are needed (one goes to val)"
        )
    return DataError(f"all {num_docs} documents fell into val; lower --val-fraction")


def get_tokenizer(corpus_docs, cfg: PrepareConfig, dest: Path) -> TokenizerInfo:
    if cfg.tokenizer:
        _, info = load_tokenizer(cfg.tokenizer)   # errors name the user's file, not the copy
        shutil.copyfile(cfg.tokenizer, dest)
        if cfg.vocab_size is not None and cfg.vocab_size != info.vocab_size:
            raise DataError(
                f"--vocab-size {cfg.vocab_size} disagrees with --tokenizer {cfg.tokenizer} "
                f"(vocab_size={info.vocab_size}); drop --vocab-size"
            )
        logger.info("using tokenizer %s (vocab_size=%d, sha256 %s)", cfg.tokenizer, info.vocab_size, info.sha256)
        return info
    vocab_size = cfg.vocab_size or DEFAULT_VOCAB_SIZE
    start = time.perf_counter()
    texts = tokenizer_sample(corpus_docs, cfg)
    blob = train_tokenizer(texts, vocab_size, cfg.model_type, num_threads=os.cpu_count() or 1)
    dest.write_bytes(blob)
    _, info = load_tokenizer(dest)
    logger.info(
        "trained %s tokenizer vocab_size=%d on %d train documents (%.1f MB) in %.1fs",
        cfg.model_type, vocab_size, len(texts), sum(len(t.encode("utf-8")) for t in texts) / 1e6,
        time.perf_counter() - start,
    )
    return info


def replace_path(src: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    os.replace(src, dst)


def vocabulary_meta(info: TokenizerInfo) -> dict:
    """The tokenizer's fields every meta.json carries (what check_vocab compares with the model)."""
    return {"vocab_size": info.vocab_size, "pad_id": info.pad_id, "unk_id": info.unk_id, "eod_id": info.eod_id,
            "mask_id": info.mask_id, "tokenizer_sha256": info.sha256}
