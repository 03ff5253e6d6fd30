"""Write an lm-evaluation-harness task for a local JSON-lines generation file (the format of eval.tasks
with `mode: generate`, evaluation/generation_tasks.py), so lm-eval scores it by exact match:

    python -m evaluation.lm_eval_local_task --jsonl data/gsm8k_dev.jsonl --name gsm8k_dev --out tasks/ \
        [--answer-regex '#### (\\-?[0-9.,]+)'] [--max-gen-toks 256] [--until Question: --until '\\n\\n' (a blank line)]
    python -m evaluation.lm_eval_adapter --model ecdlm --model_args path=runs/sft \
        --include_path tasks/ --tasks gsm8k_dev

The task (lm-eval 0.4 YAML) reads the file through the `json` dataset builder by its absolute
path, asks for greedy generate_until (max_gen_toks, until) after `prompt` (or `question`), and
reports `exact_match,answer`: the completion and the reference `answer` (or `response`) compared
after stripping whitespace, or, with --answer-regex, after both are reduced to the regex's first
match (group 1 if it has one; a reference without a match counts whole), as the on-the-fly task
does. Before writing, the file is read and the prompt and target templates are rendered with
lm-eval's own template engine on every line and checked against evaluation/generation_tasks.py,
so the two ways of scoring the file agree.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Optional, Sequence

import yaml

from .generation_tasks import load_generation_jsonl, reference_answer

PROMPT = "(prompt if prompt is defined and prompt is not none else question)"
ANSWER = "(answer if answer is defined and answer is not none else response)"
FILTER_NAME = "answer"   # lm-eval reports the metric as exact_match,<filter name>
_LEADING_FLAGS = re.compile(r"^\(\?[aiLmsux]+\)")


def unescape(stop: str) -> str:
    """A --until value as typed in a shell: backslash-n and backslash-t are a newline and a tab
    ("\\\\" a backslash), since a shell passes "\\n" through as two characters."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], stop)


def check_regex(pattern: str) -> re.Pattern:
    try:
        rx = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"--answer-regex {pattern!r} is not a valid regular expression: {err}") from None
    if rx.groups > 1:   # lm-eval's regex filter takes the first non-empty group, ours group 1
        raise ValueError(f"--answer-regex {pattern!r} has {rx.groups} groups; use one (and (?:...) for "
                         "the others) so that lm-eval and eval.tasks extract the same text")
    return rx


def jinja_string(text: str) -> str:
    """`text` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def target_template(pattern: Optional[str]) -> str:
    """Jinja for the reference: trimmed, and with a pattern reduced to its first match (group 1 if
    any) by lm-eval's regex_replace filter, left whole where the pattern does not match."""
    if pattern is None:
        return "{{ " + ANSWER + " | string | trim }}"
    flags = _LEADING_FLAGS.match(pattern)   # global flags must open the whole pattern
    head, body = (flags.group(0), pattern[flags.end():]) if flags else ("", pattern)
    inner = f"(?:{body})" if re.compile(pattern).groups else f"({body})"
    whole = f"{head}(?s)^.*?{inner}.*$" if not head else f"{head[:-1]}s)^.*?{inner}.*$"
    return ("{{ " + ANSWER + " | string | regex_replace(" + jinja_string(whole) + ", " + jinja_string("\\1") +
            ", 1) | trim }}")


def task_spec(name: str, jsonl: str, pattern: Optional[str], max_gen_toks: int, until: Sequence[str]) -> dict:
    extract = ([{"function": "regex", "regex_pattern": pattern, "group_select": 0, "fallback": "[invalid]"}]
               if pattern is not None else [{"function": "remove_whitespace"}])
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.abspath(jsonl)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{ " + PROMPT + " }}",
        "doc_to_target": target_template(pattern),
        "generation_kwargs": {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False,
                              "temperature": 0.0},
        "filter_list": [{"name": FILTER_NAME, "filter": extract + [{"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1, "source": os.path.abspath(jsonl)},
    }


def check_templates(spec: dict, jsonl: str, pattern: Optional[str]) -> None:
    """Render the templates with lm-eval's engine on every line: the prompt must be the line's
    prompt and the target the reference answer evaluation/generation_tasks.py compares with."""
    from lm_eval.utils import apply_template
    items = load_generation_jsonl(jsonl)
    with open(jsonl) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for n, (row, item) in enumerate(zip(rows, items), 1):
        doc = {k: row.get(k) for k in ("prompt", "question", "answer", "response")}
        doc = {k: v for k, v in doc.items() if v is not None or k in row}
        prompt, target = apply_template(spec["doc_to_text"], doc), apply_template(spec["doc_to_target"], doc)
        want = reference_answer(item.answer, pattern)
        if prompt != item.prompt or target != want:
            raise ValueError(f"{jsonl}:{n}: the lm-eval templates give prompt {prompt!r} and target {target!r}, "
                             f"not {item.prompt!r} and {want!r}; the pattern cannot be embedded in a template")


def write_task(jsonl: str, name: str, out_dir: str, pattern: Optional[str] = None, max_gen_toks: int = 32,
               until: Sequence[str] = ()) -> str:
    """Check everything, then write <out_dir>/<name>.yaml; returns its path."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"--name {name!r} must be letters, digits, '_', '.' or '-' (an lm-eval task name)")
    if not os.path.isfile(jsonl):
        raise ValueError(f"--jsonl {jsonl} is not a file")
    if max_gen_toks < 1:
        raise ValueError(f"--max-gen-toks={max_gen_toks} must be >= 1")
    if any(not s for s in until):
        raise ValueError("--until strings must be non-empty")
    if pattern is not None:
        check_regex(pattern)
    spec = task_spec(name, jsonl, pattern, max_gen_toks, until)
    check_templates(spec, jsonl, pattern)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False, allow_unicode=True, width=1_000_000)   # one line per template
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write an lm-eval task YAML for a local JSON-lines generation file.")
    p.add_argument("--jsonl", required=True, help="JSON lines: prompt (or question) and answer (or response)")
    p.add_argument("--name", required=True, help="the lm-eval task name (--tasks NAME)")
    p.add_argument("--out", required=True, help="directory for NAME.yaml (lm-eval's --include_path)")
    p.add_argument("--answer-regex", default=None, help="compare the first match (group 1 if any) of both sides")
    p.add_argument("--max-gen-toks", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--until", action="append", default=[],
                   help="stop string (repeatable); \\n and \\t are a newline and a tab")
    args = p.parse_args(argv)
    try:
        path = write_task(args.jsonl, args.name, args.out, args.answer_regex, args.max_gen_toks,
                          [unescape(u) for u in args.until])
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}; run it with: python -m evaluation.lm_eval_adapter --model ecdlm --model_args path=RUN "
          f"--include_path {os.path.dirname(os.path.abspath(path))} --tasks {args.name} "
          f"(metric exact_match,{FILTER_NAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
