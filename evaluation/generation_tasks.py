"""Generation tasks scored by exact match, during training (eval.tasks with `mode: generate`) and
from Python: greedy iterative-unmasking generation (evaluation/sample.py) after each prompt, the
completion cut at the first end-of-text token and at any stop string, then compared with the
reference answer after stripping surrounding whitespace.

Each JSON line: {"prompt": str, "answer": str} ("question" is accepted for "prompt" and
"response" for "answer"; a number as answer is compared as its text).

With `answer_regex`, both sides are reduced to the regex's first match (group 1 if the pattern
has a group, else the whole match) before comparing: a completion with no match is wrong, a
reference with no match is compared whole, so "... #### 42" and "42" are both reference "42"
under r"#### (\\-?[0-9.,]+)".

Collective when world > 1, like evaluation/multiple_choice.py: every rank takes every world-th
item (padding with repeats it discards, so all ranks make the same number of generate calls) and
the counts are summed with one all_reduce. Under expert parallelism every forward is an
all-to-all whose sizes the ranks must agree on, so every generate call then has the same shape on
every rank and takes the same path: batch_size prompts (the last batch filled with repeats) plus
two rows whose results are ignored, the task's longest prompt (it sets the left-padded length) and
an empty prompt (left padding in every call: a call without any takes the static-capacity path,
whose sizes each rank derives alone, while one with padding exchanges them).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .inference import expert_parallel
from .multiple_choice import dist_info, rank_share
from .sample import SampleConfig, generate, truncate_at_stops


@dataclass
class GenItem:
    prompt: str
    answer: str


def _field(row: dict, names: tuple):
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


def load_generation_jsonl(path: str, limit: Optional[int] = None) -> list:
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON object ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object with 'prompt' and 'answer'")
            if "choices" in row:   # its answer is an index, which no completion should equal
                raise ValueError(f"{path}:{n}: a multiple-choice line (it has 'choices'); generate tasks need "
                                 "'prompt' and 'answer' text, multiple choice is mode single_mask or likelihood")
            prompt, answer = _field(row, ("prompt", "question")), _field(row, ("answer", "response"))
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{path}:{n}: need a non-empty string 'prompt' (or 'question')")
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise ValueError(f"{path}:{n}: need an 'answer' (or 'response'): a string or a number, "
                                 f"got {answer!r}")
            items.append(GenItem(prompt, str(answer)))
            if limit and len(items) == limit:
                break
    if not items:
        raise ValueError(f"{path}: no items")
    return items


# ---- scoring (pure) -----------------------------------------------------------------------------
def extract_answer(text: str, pattern: Optional[str]) -> Optional[str]:
    """The regex's first match in `text` (group 1 if the pattern has a group), stripped; `text`
    stripped when there is no pattern; None when the pattern does not match."""
    if pattern is None:
        return text.strip()
    rx = re.compile(pattern)
    m = rx.search(text)
    if m is None:
        return None
    got = m.group(1) if rx.groups else m.group(0)
    return (got or "").strip()   # a group that took no part in the match: empty


def reference_answer(answer: str, pattern: Optional[str]) -> str:
    """The reference reduced the same way, when the pattern matches it; else the whole of it."""
    got = extract_answer(answer, pattern)
    return answer.strip() if got is None else got


def exact_match(completion: str, answer: str, pattern: Optional[str] = None) -> bool:
    pred = extract_answer(completion, pattern)
    return pred is not None and pred == reference_answer(answer, pattern)


def completion_text(tok, ids: Sequence[int], stops: Sequence[str]) -> str:
    """The generated ids as text: up to the first end-of-text token, then up to the first stop."""
    ids = [int(i) for i in ids]
    if tok.eod_id in ids:
        ids = ids[:ids.index(tok.eod_id)]
    return truncate_at_stops(tok.decode(ids), stops)


# ---- generation ---------------------------------------------------------------------------------
def sample_config(task, eod_id: Optional[int] = None) -> SampleConfig:
    """Greedy (temperature 0, low-confidence remasking) sampling with the task's lengths and
    decoding settings. With `eod_id`, generation stops early once every row has committed it:
    the completion is cut there anyway, so the score cannot change."""
    return SampleConfig(gen_length=task.gen_length, steps=task.steps or task.gen_length,
                        block_length=task.block_length, temperature=0.0, seed=task.seed,
                        decoding=getattr(task, "decoding", "fixed"), threshold=getattr(task, "threshold", 0.9),
                        cache=getattr(task, "cache", "none"), eod_id=eod_id)


def prompt_ids(model, tok, item: GenItem, gen_length: int) -> list:
    """The prompt's ids, cut from the left so that prompt + generation fit the model."""
    room = model.cfg.model.max_seq_len - gen_length
    if room < 1:
        raise ValueError(f"gen_length={gen_length} leaves no room for a prompt in "
                         f"model.max_seq_len={model.cfg.model.max_seq_len}")
    ids = tok.encode(item.prompt)
    return ids[max(0, len(ids) - room):]


def completions(model, tok, items: Sequence[GenItem], task, shape_row: Optional[list] = None) -> list:
    """Completion text per item, batch_size prompts per generate call; with `shape_row` (expert
    parallelism) every call gets batch_size rows, then that row and an empty one (results dropped)."""
    sc = sample_config(task, tok.eod_id)   # greedy: the result depends on no random draw
    out = []
    for i in range(0, len(items), task.batch_size):
        batch = [prompt_ids(model, tok, it, sc.gen_length) for it in items[i:i + task.batch_size]]
        rows = batch
        if shape_row is not None:
            rows = batch + [shape_row] * (task.batch_size + 1 - len(batch)) + [[]]
        gen = generate(model, rows, sc)
        out += [completion_text(tok, row, task.stop) for row in gen.generated_BG[:len(batch)].tolist()]
    return out


def evaluate_generation(model, tok, items: Sequence[GenItem], task, rank: Optional[int] = None,
                        world: Optional[int] = None) -> dict:
    """{"exact_match": fraction, "n": items}; the same on every rank. `task` is an
    EvalTaskConfig (or anything with its generate-mode fields)."""
    sample_config(task).validate()
    rank, world = dist_info(rank, world)
    was_training = model.training
    model.eval()
    idx, real = rank_share(len(items), rank, world)
    shape_row = None
    if expert_parallel(model):   # every rank sees every item, so all agree on the longest prompt
        shape_row = max((prompt_ids(model, tok, it, task.gen_length) for it in items), key=len)
    texts = completions(model, tok, [items[i] for i in idx], task, shape_row)
    hits = sum(exact_match(t, items[i].answer, task.answer_regex) for t, i in zip(texts[:real], idx[:real]))
    counts = torch.tensor([float(hits), float(real)], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist
        from trainer.distributed import comm_device
        counts = counts.to(comm_device())
        dist.all_reduce(counts)
        counts = counts.cpu()
    model.train(was_training)
    hits, n = counts.tolist()
    return {"exact_match": hits / max(n, 1), "n": int(n)}
