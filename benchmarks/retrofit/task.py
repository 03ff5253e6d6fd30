"""The synthetic fine-tuning task: copy a 5-digit string.

    "copy 38172 =" -> " 38172"

Why this task: every digit is one token of the default corpus's tokenizer, a guess of five
digits is right with probability 1e-5 (chance exact match ~0), and held-out strings never occur
in the training file, so a right answer means attention learned to fetch the digit a fixed
distance back. Measured on the tiny preset after a short TC pretrain (300 SFT steps, batch 32,
seq_len 32): copying 5 digits reaches ~90% held-out exact match by step 150; copying 4-6 digit
strings (the offset then varies) reached 5%, and reversing reached 0%, so those stay options
(`kind`, `min_digits`, `max_digits`) rather than the default.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


KINDS = ("reverse", "copy")


def make_example(digits: str, kind: str = "copy") -> dict:
    answer = digits[::-1] if kind == "reverse" else digits
    return {"prompt": f"{kind} {digits} =", "response": f" {answer}"}


def chance_exact_match(min_digits: int, max_digits: int) -> float:
    """Probability that a uniform guess of the right length is right, averaged over lengths."""
    return sum(10.0 ** -n for n in range(min_digits, max_digits + 1)) / (max_digits - min_digits + 1)


def write_task(out_dir: str, n_train: int, n_heldout: int, min_digits: int = 5, max_digits: int = 5,
               seed: int = 0, kind: str = "copy") -> dict:
    """train.jsonl (prompt/response, for `prepare --format sft`) and heldout.jsonl (prompt/answer,
    for an eval.tasks generate entry) with distinct digit strings; returns their paths."""
    if kind not in KINDS:
        raise ValueError(f"task kind {kind!r} must be one of {', '.join(KINDS)}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits ({min_digits}) <= max_digits ({max_digits})")
    space = sum(10 ** n for n in range(min_digits, max_digits + 1))
    if n_train + n_heldout > space // 2:   # rejection sampling below needs room to find fresh strings
        raise ValueError(f"{n_train} + {n_heldout} examples is too many for {min_digits}-{max_digits} digit "
                         f"strings (at most {space // 2})")
    rng = random.Random(seed)
    seen: set = set()
    strings = []
    while len(strings) < n_train + n_heldout:
        n = rng.randint(min_digits, max_digits)
        s = "".join(rng.choice("0123456789") for _ in range(n))
        if s not in seen:
            seen.add(s)
            strings.append(s)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"train": os.path.join(out_dir, "train.jsonl"), "heldout": os.path.join(out_dir, "heldout.jsonl")}
    with open(paths["train"], "w") as f:
        for s in strings[:n_train]:
            f.write(json.dumps(make_example(s, kind)) + "\n")
    with open(paths["heldout"], "w") as f:
        for s in strings[n_train:]:
            ex = make_example(s, kind)
            f.write(json.dumps({"prompt": ex["prompt"], "answer": ex["response"].strip()}) + "\n")
    return paths


def prepare_task(train_jsonl: str, out: str, seq_len: int, tokenizer: str) -> str:
    """`python -m trainer.data prepare --format sft` with the pretraining data's tokenizer."""
    cmd = [sys.executable, "-m", "trainer.data", "prepare", "--format", "sft", "--files", train_jsonl,
           "--out", out, "--seq-len", str(seq_len), "--tokenizer", tokenizer]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"prepare --format sft failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return out
