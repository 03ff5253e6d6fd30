"""`prepare`: corpus -> tokenizer -> token shards for a train and a val split.

The output directory only looks prepared (has meta.json) once everything is in place:
the splits are built under a temporary folder, the old meta.json is removed, the new
files are renamed into place, and meta.json is written last.
"""

import logging
import multiprocessing
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .corpus import Corpus, Document, FilesCorpus, HubCorpus, StdlibCorpus, capped
from .meta import FORMAT_VERSION, META_FILE, write_json_atomic
from .prepare_common import (SPLITS, TOKENIZER_FILE, PrepareConfig, check_out, get_tokenizer, is_val,
                             no_train_docs, replace_path, vocabulary_meta)
from .sft_prepare import prepare_sft
from .shards import ShardWriter
from rundir.tokenizer import TokenizerInfo

from .tokenizer import encode_chunk, init_worker, token_dtype

logger = logging.getLogger(__name__)

# The whole CPython 3.11 standard library without tests is ~12 MB; the cap keeps newer or
# larger installations near a one-minute prepare on two cores.
STDLIB_MAX_BYTES = 16_000_000
# Work units for the tokenizer pool: big enough to amortize pickling, small enough to
# keep every worker busy and the progress bar moving.
_CHUNK_BYTES = 1 << 20
_CHUNK_DOCS = 512


def open_corpus(cfg: PrepareConfig, cache_dir: Path) -> Tuple[Corpus, Optional[int]]:
    """The corpus and its byte cap."""
    if cfg.dataset:
        return HubCorpus(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field), cfg.max_bytes
    if cfg.files:
        return FilesCorpus(cfg.files, cfg.text_field, cache_dir=str(cache_dir)), cfg.max_bytes
    max_bytes = cfg.max_bytes if cfg.max_bytes is not None else STDLIB_MAX_BYTES
    return StdlibCorpus(), max_bytes


def _chunks(docs: Iterable[Document], val_fraction: float) -> Iterator[Tuple[str, List[str]]]:
    """Group documents into single-split work units, preserving order within each split."""
    pending: Dict[str, List[str]] = {s: [] for s in SPLITS}
    sizes = {s: 0 for s in SPLITS}
    for position, doc in enumerate(docs):
        split = "val" if is_val(position, doc.identity, val_fraction) else "train"
        pending[split].append(doc.text)
        sizes[split] += len(doc.text)
        if sizes[split] >= _CHUNK_BYTES or len(pending[split]) >= _CHUNK_DOCS:
            yield split, pending[split]
            pending[split], sizes[split] = [], 0
    for split in SPLITS:
        if pending[split]:
            yield split, pending[split]


def _encode_all(chunks: Iterable[Tuple[str, List[str]]], model_path: Path, num_workers: int):
    """Yield (split, number of documents, encode_chunk result) in submission order."""
    if num_workers <= 1:
        init_worker(str(model_path))
        for split, texts in chunks:
            yield split, len(texts), encode_chunk(texts)
        return
    # spawn: a forked child would inherit whatever threads datasets/tqdm started.
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_workers, initializer=init_worker, initargs=(str(model_path),)) as pool:
        # A bounded window instead of imap: imap would read the whole corpus into memory.
        window = deque()
        for split, texts in chunks:
            window.append((split, len(texts), pool.apply_async(encode_chunk, (texts,))))
            if len(window) >= 2 * num_workers:
                split_, count, result = window.popleft()
                yield split_, count, result.get()
        while window:
            split_, count, result = window.popleft()
            yield split_, count, result.get()


def _tokenize(docs: Iterable[Document], cfg: PrepareConfig, info: TokenizerInfo, work: Path,
              bar: tqdm) -> Dict[str, ShardWriter]:
    """Encode every document into its split's shards (not yet closed)."""
    writers = {s: ShardWriter(work / s, s, token_dtype(info.vocab_size), cfg.shard_tokens) for s in SPLITS}
    start = time.perf_counter()
    num_tokens = mask_hits = 0
    encoded = _encode_all(_chunks(docs, cfg.val_fraction), work / TOKENIZER_FILE, cfg.num_workers)
    for split, count, (tokens, lengths, hits) in encoded:
        writers[split].add(tokens, lengths)
        num_tokens += len(tokens)
        mask_hits += hits
        bar.update(count)
        bar.set_postfix(tokens=f"{num_tokens:,}", refresh=False)
    seconds = time.perf_counter() - start
    logger.info(
        "tokenized %d tokens in %.1fs (%.0f tokens/s, %d workers)",
        num_tokens, seconds, num_tokens / max(seconds, 1e-9), cfg.num_workers,
    )
    if mask_hits:
        logger.warning(
            "the mask id %d occurs %d times in the data: this tokenizer turns the literal text "
            "%r into the mask token", info.mask_id, mask_hits, "<|mask|>",
        )
    return writers


def prepare(cfg: PrepareConfig) -> Dict:
    """Run the whole preparation; returns the top-level meta (also written to OUT/meta.json)."""
    cfg.validate()
    check_out(cfg)
    if cfg.format == "sft":
        return prepare_sft(cfg)
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".prepare-tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        corpus, max_bytes = open_corpus(cfg, cache_dir=work / "hf-cache")

        def docs(on_skip=None):
            # Read twice (tokenizer sample, then everything); skips are reported on the full pass.
            source = corpus.documents(on_skip) if on_skip else corpus.documents()
            return capped(source, cfg.max_docs, max_bytes)

        info = get_tokenizer(docs(), cfg, work / TOKENIZER_FILE)

        total = corpus.size_hint
        if total is not None and cfg.max_docs is not None:
            total = min(total, cfg.max_docs)
        skipped: List[str] = []
        with tqdm(total=total, unit="doc", desc="tokenizing", dynamic_ncols=True) as bar, logging_redirect_tqdm():

            def on_skip(identity: str, reason: str) -> None:
                skipped.append(identity)
                bar.update(1)
                logger.warning("skipping %s: %s", identity, reason)

            writers = _tokenize(docs(on_skip), cfg, info, work, bar)
        num_docs = sum(w.num_docs for w in writers.values())
        if writers["train"].num_docs == 0:
            raise no_train_docs(num_docs)

        shared = {**vocabulary_meta(info),
                  "source": {**corpus.source, "max_docs": cfg.max_docs, "max_bytes": max_bytes}}
        split_meta = {s: w.close(shared) for s, w in writers.items()}
        # Until here a failed run leaves an earlier complete output untouched; from here
        # on OUT does not look prepared until the new meta.json lands.
        (out / META_FILE).unlink(missing_ok=True)
        for name in (*SPLITS, TOKENIZER_FILE):
            replace_path(work / name, out / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    meta = {
        **shared,
        "format_version": FORMAT_VERSION,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_trained": not cfg.tokenizer,
        "model_type": cfg.model_type if not cfg.tokenizer else None,
        "dtype": token_dtype(info.vocab_size).name,
        "val_fraction": cfg.val_fraction,
        "num_docs": num_docs,
        "skipped_docs": len(skipped),
        "splits": {s: {"num_tokens": m["num_tokens"], "num_docs": m["num_docs"]} for s, m in split_meta.items()},
    }
    write_json_atomic(out / META_FILE, meta)  # last: the "prepared" marker
    logger.info(
        "prepared %s: %d documents (%d skipped); train %d tokens in %d docs, val %d tokens in %d docs; %.1fs",
        out, num_docs, len(skipped),
        split_meta["train"]["num_tokens"], split_meta["train"]["num_docs"],
        split_meta["val"]["num_tokens"], split_meta["val"]["num_docs"], time.perf_counter() - start,
    )
    return meta
