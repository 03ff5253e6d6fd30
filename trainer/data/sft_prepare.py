"""`prepare --format sft`: prompt/response or chat records -> fixed-length examples per split.

Every example becomes one sequence of exactly seq_len tokens:

    prompt ids | response ids | EOS EOS ... EOS        (EOS = the tokenizer's end-of-document id)
    <- prompt_len ->

Prompt and response are tokenized separately, without special tokens. The EOS fill belongs to
the response, as in LLaDA's SFT: it is maskable and carries loss, so the model learns where an
answer ends (and, at sampling time, fills the rest of a generation window with EOS). At least one
EOS must follow the response, so an example with prompt + response + 1 > seq_len tokens is
dropped and counted (logged, and recorded in meta.json as dropped_too_long).

Layout of OUT: tokenizer.model (the tokenizer file, whatever its kind, as for pretraining; plus
tokenizer_config.json when its chat template was used), meta.json, and per split (train/, val/)
examples.safetensors holding `tokens` [N, seq_len] (uint16 below 65536 tokens, else uint32) and
`prompt_len` [N] int32, and the split's meta.json. The split is prepare.is_val of the record's
content. The output appears atomically: built under OUT/.prepare-tmp, meta.json written last.
"""

import dataclasses
import itertools
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from safetensors.numpy import save
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .corpus import Document
from rundir.errors import DataError
from .meta import FORMAT_VERSION, META_FILE, write_json_atomic
from .prepare_common import (SPLITS, TOKENIZER_FILE, PrepareConfig, get_tokenizer, is_val, no_train_docs,
                             replace_path, vocabulary_meta)
from .sft_records import (
    TOKENIZER_CONFIG, DatasetRecords, JsonlRecords, SFTFields, SFTRecord, SimpleTemplate, render_all,
    resolve_tokenizer, template_for,
)
from rundir.tokenizer import TokenizerInfo, load_tokenizer

from .tokenizer import token_dtype

logger = logging.getLogger(__name__)

EXAMPLES_FILE = "examples.safetensors"
_BATCH = 1024  # records rendered and tokenized together (batch encoding is multithreaded)


def validate_sft(cfg: PrepareConfig) -> None:
    """The checks only --format sft needs (PrepareConfig.validate has run)."""
    if not (cfg.files or cfg.dataset):
        raise DataError("--format sft needs its records: give --files F.jsonl ... or --dataset NAME")
    if cfg.seq_len is None or cfg.seq_len < 2:
        raise DataError(f"--format sft needs --seq-len N (N >= 2: at least one token and one EOS), got {cfg.seq_len}")
    if cfg.max_bytes is not None:
        raise DataError("--max-bytes applies to pretraining only; cap SFT data with --max-docs")
    names = {"--prompt-field": cfg.prompt_field, "--response-field": cfg.response_field,
             "--messages-field": cfg.messages_field}
    if len(set(names.values())) < 3 or not all(names.values()):
        raise DataError(f"the SFT field names must be distinct and non-empty, got {names}")


def _open_records(cfg: PrepareConfig):
    fields = SFTFields(cfg.prompt_field, cfg.response_field, cfg.messages_field)
    if cfg.files:
        return JsonlRecords(cfg.files, fields)
    return DatasetRecords(cfg.dataset, cfg.dataset_config, cfg.split, fields)


class _SplitBuilder:
    """The examples of one split, accumulated in memory (N x seq_len tokens) until written."""

    def __init__(self, seq_len: int, dtype: np.dtype, eod_id: int):
        self.seq_len, self.dtype, self.eod_id = seq_len, dtype, eod_id
        self._tokens: List[np.ndarray] = []
        self._prompt_lens: List[int] = []
        self.dropped_too_long = 0
        self.num_prompt_tokens = self.num_response_tokens = 0

    @property
    def num_examples(self) -> int:
        return len(self._prompt_lens)

    def add(self, prompt_ids: List[int], response_ids: List[int]) -> None:
        used = len(prompt_ids) + len(response_ids)
        if used + 1 > self.seq_len:  # no room for the EOS that ends the response
            self.dropped_too_long += 1
            return
        row = np.full(self.seq_len, self.eod_id, dtype=self.dtype)
        row[: len(prompt_ids)] = prompt_ids
        row[len(prompt_ids): used] = response_ids
        self._tokens.append(row)
        self._prompt_lens.append(len(prompt_ids))
        self.num_prompt_tokens += len(prompt_ids)
        self.num_response_tokens += len(response_ids)

    def write(self, directory: Path, split: str, shared: Dict) -> Dict:
        directory.mkdir(parents=True)
        tokens = np.stack(self._tokens) if self._tokens else np.zeros((0, self.seq_len), self.dtype)
        prompt_len = np.asarray(self._prompt_lens, dtype=np.int32)
        # save() + write_bytes rather than save_file, which creates the file readable by its owner only.
        blob = save({"tokens": tokens, "prompt_len": prompt_len}, metadata={"format": "ecdlm-sft", "split": split})
        (directory / EXAMPLES_FILE).write_bytes(blob)
        meta = {
            **shared,
            "format_version": FORMAT_VERSION,
            "format": "sft",
            "split": split,
            "file": EXAMPLES_FILE,
            "seq_len": self.seq_len,
            "dtype": self.dtype.name,
            "num_examples": self.num_examples,
            "dropped_too_long": self.dropped_too_long,
            "num_tokens": self.num_examples * self.seq_len,  # stored, EOS fill included
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_response_tokens": self.num_response_tokens,  # EOS fill excluded
        }
        write_json_atomic(directory / META_FILE, meta)
        return meta


def _check_all(records: Iterator[SFTRecord]) -> int:
    """Parse every record once, so a bad line fails before any tokenizer training or encoding."""
    return sum(1 for _ in records)


def _batches(records: Iterator[SFTRecord], size: int) -> Iterator[List[SFTRecord]]:
    while True:
        batch = list(itertools.islice(records, size))
        if not batch:
            return
        yield batch


def _encode(tokenizer, texts: List[str]) -> List[List[int]]:
    return tokenizer.encode(texts, num_threads=os.cpu_count() or 1) if texts else []


def _tokenize(records: Iterator[SFTRecord], template: SimpleTemplate, tokenizer, info: TokenizerInfo,
              cfg: PrepareConfig, total: Optional[int]) -> Tuple[Dict[str, _SplitBuilder], int]:
    builders = {s: _SplitBuilder(cfg.seq_len, token_dtype(info.vocab_size), info.eod_id) for s in SPLITS}
    mask_hits = position = 0
    with tqdm(total=total, unit="example", desc="tokenizing", dynamic_ncols=True) as bar, logging_redirect_tqdm():
        for batch in _batches(records, _BATCH):
            prompts, responses = render_all(batch, template)
            for record, p_ids, r_ids in zip(batch, _encode(tokenizer, prompts), _encode(tokenizer, responses)):
                split = "val" if is_val(position, record.identity, cfg.val_fraction) else "train"
                builders[split].add(p_ids, r_ids)
                mask_hits += p_ids.count(info.mask_id) + r_ids.count(info.mask_id)
                position += 1
            bar.update(len(batch))
    if mask_hits:
        logger.warning("the mask id %d occurs %d times in the examples: this tokenizer turns some text into "
                       "the mask token", info.mask_id, mask_hits)
    return builders, position


def prepare_sft(cfg: PrepareConfig) -> Dict:
    """Run the whole SFT preparation; returns the top-level meta (also written to OUT/meta.json)."""
    validate_sft(cfg)
    start = time.perf_counter()
    source = _open_records(cfg)

    def records() -> Iterator[SFTRecord]:
        return itertools.islice(source.records(), cfg.max_docs)

    token_file, config_file = resolve_tokenizer(cfg.tokenizer) if cfg.tokenizer else (None, None)
    template = template_for(token_file, config_file)
    # A remote stream would be downloaded once more just to check it; there, errors surface while tokenizing.
    total = None if source.remote else _check_all(records())
    if total == 0:
        raise no_train_docs(0)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".prepare-tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        # The tokenizer trains on train examples only (the simple rendering: no chat template without a given
        # tokenizer), through pretraining's own sampling, so the split rule is the same.
        docs = (Document(r.identity, "".join(SimpleTemplate().render(r))) for r in records())
        tok_cfg = dataclasses.replace(cfg, tokenizer=str(token_file) if token_file else None)
        info = get_tokenizer(docs, tok_cfg, work / TOKENIZER_FILE)
        tokenizer, _ = load_tokenizer(work / TOKENIZER_FILE)
        names = [TOKENIZER_FILE]
        if template.description["kind"] == "chat_template":
            shutil.copyfile(config_file, work / TOKENIZER_CONFIG)
            names.append(TOKENIZER_CONFIG)

        builders, num_records = _tokenize(records(), template, tokenizer, info, cfg, total)
        if builders["train"].num_examples == 0:
            if builders["train"].dropped_too_long:
                raise DataError(f"every train example is longer than --seq-len {cfg.seq_len} - 1 tokens "
                                f"({builders['train'].dropped_too_long} dropped); raise --seq-len")
            raise no_train_docs(num_records)
        if builders["val"].num_examples == 0:
            logger.warning("the val split is empty (all its examples were too long); validation will fail")
        shared = {**vocabulary_meta(info), "source": {**source.source, "max_docs": cfg.max_docs}}
        split_meta = {s: b.write(work / s, s, shared) for s, b in builders.items()}
        # Until here a failed run leaves an earlier complete output untouched; from here
        # on OUT does not look prepared until the new meta.json lands.
        (out / META_FILE).unlink(missing_ok=True)
        (out / TOKENIZER_CONFIG).unlink(missing_ok=True)  # a stale template must not outlive its data
        for name in (*SPLITS, *names):
            replace_path(work / name, out / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    dropped = sum(b.dropped_too_long for b in builders.values())
    meta = {
        **shared,
        "format_version": FORMAT_VERSION,
        "format": "sft",
        "seq_len": cfg.seq_len,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_trained": not cfg.tokenizer,
        "model_type": cfg.model_type if not cfg.tokenizer else None,
        "dtype": token_dtype(info.vocab_size).name,
        "val_fraction": cfg.val_fraction,
        "template": template.description,
        "template_fallbacks": template.fallbacks,
        "num_records": num_records,
        "num_examples": num_records - dropped,
        "dropped_too_long": dropped,
        "dropped_share": dropped / max(num_records, 1),
        "splits": {s: {k: m[k] for k in ("num_examples", "dropped_too_long", "num_tokens")}
                   for s, m in split_meta.items()},
    }
    write_json_atomic(out / META_FILE, meta)  # last: the "prepared" marker
    if template.fallbacks:
        logger.warning("%d chat renderings did not start with their own prompt; their response is the bare "
                       "assistant content (no end-of-turn marker)", template.fallbacks)
    log = logger.warning if dropped else logger.info
    log("dropped %d of %d examples (%.2f%%) longer than seq_len - 1 = %d tokens", dropped, num_records,
        100.0 * dropped / max(num_records, 1), cfg.seq_len - 1)
    logger.info("prepared %s: train %d examples, val %d examples of %d tokens (%s template); %.1fs", out,
                split_meta["train"]["num_examples"], split_meta["val"]["num_examples"], cfg.seq_len,
                template.description["kind"], time.perf_counter() - start)
    return meta
