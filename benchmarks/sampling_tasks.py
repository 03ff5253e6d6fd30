"""Tasks and tiny models for measuring samplers (benchmarks/sampling.py and its tests).

Two tasks at the token level, so a tiny model learns them in a few hundred CPU steps:
- `copy`: the retrofit demonstration's task (benchmarks/retrofit/task.py: "copy 38172 =" -> " 38172")
  with one token per word and digit: [COPY d1..d5 =] -> [d1..d5 EOD].
- `count`: a long answer: [COUNT s =] -> s, s+1, s+2, ... (over 16 symbols, cyclically) for
  `length` tokens, then EOD. Each token follows from any decided one at a known distance.
  Learned exactly at length 31 in 300 steps (dense, batch 32); at 127 (generation 128) in 6000
  steps of batch 32 (dense: 100% exact match; 62% at 1500 steps, 84% at 4000), about 7 minutes on
  one core of an idle 2-core EPYC. Copying a 64-symbol string or repeating a 4-symbol pattern to
  127 tokens was not learned in 400 steps (on a loaded machine; not tried further).
Chance exact match is 10^-5 and 1/16. The answer is followed by end-of-text up to the end of
the canvas (LLaDA's fine-tuning pads responses with EOS), so a model learns to end its answer.

Models: ModelConfig of the given router (EC static, EC linear_reverse, TC, dense) at the same
active parameters (every MoE layer applies k experts of width h per token on average, dense uses
a SwiGLU of width k h), trained with the fine-tuning objective (prompt never masked, the mask
ratio counted over the response).

Legend: B batch, L canvas (prompt + gen_length).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

PAD, EOD, MASK = 0, 1, 3
COPY, EQ, COUNT = 4, 5, 2
DIGITS = list(range(6, 16))     # the copy task's digits
SYMBOLS = list(range(16, 32))   # the count task's alphabet
VOCAB = 32

ARCHS = {   # name -> moe section; every one applies k=2 experts of width 32 per token (dense: 64)
    "ec_static": {"router": "expert_choice"},
    "ec_linear_reverse": {"router": "expert_choice",
                          "capacity": {"schedule": "linear_reverse", "k_min": 1, "k_max": 3}},
    "tc": {"router": "token_choice", "capacity_factor": None},
    "dense": {"router": "dense"},
}


@dataclass
class Example:
    prompt: list
    answer: list   # ends with EOD


def make_examples(task: str, n: int, seed: int, length: int = 64) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if task == "copy":
            s = [rng.choice(DIGITS) for _ in range(5)]
        elif task == "count":
            first = rng.randrange(len(SYMBOLS))
            run = [SYMBOLS[(first + i) % len(SYMBOLS)] for i in range(length)]
            out.append(Example([COUNT, SYMBOLS[first], EQ], [*run, EOD]))
            continue
        else:
            raise ValueError(f"task={task!r} must be copy or count")
        out.append(Example([COPY, *s, EQ], [*s, EOD]))
    return out


def model_config(arch: str, max_seq_len: int, d_model: int = 64, n_layers: int = 2):
    from model import ModelConfig, from_dict
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} must be one of {', '.join(ARCHS)}")
    moe = {"num_experts": 8, "expert_hidden": 32, "k": 2, **ARCHS[arch]}
    return from_dict(ModelConfig, {"model": {"vocab_size": VOCAB, "d_model": d_model, "n_layers": n_layers,
                                             "n_heads": 4, "max_seq_len": max_seq_len},
                                   "moe": moe, "diffusion": {"mask_ratio_over": "response"}})


def canvas_rows(examples: list, gen_length: int) -> tuple:
    """([B, L] tokens, [B, L] prompt mask): prompt then answer, EOD up to gen_length."""
    P = max(len(e.prompt) for e in examples)
    tokens = torch.full((len(examples), P + gen_length), EOD, dtype=torch.long)
    prompt = torch.zeros_like(tokens, dtype=torch.bool)
    for b, e in enumerate(examples):   # equal prompt lengths in these tasks: no padding
        if len(e.prompt) != P or len(e.answer) > gen_length:
            raise ValueError("examples need equal prompt lengths and answers that fit gen_length")
        tokens[b, :P] = torch.tensor(e.prompt)
        tokens[b, P:P + len(e.answer)] = torch.tensor(e.answer)
        prompt[b, :P] = True
    return tokens, prompt


def train(arch: str, examples: list, gen_length: int, steps: int, batch: int = 32, lr: float = 3e-3,
          seed: int = 0, **arch_kw):
    """A model of `arch` trained on `examples` (fine-tuning objective), in eval mode."""
    from model import DiffusionTransformer, forward_loss
    tokens, prompt = canvas_rows(examples, gen_length)
    model = DiffusionTransformer(model_config(arch, tokens.shape[1], **arch_kw), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:   # short warm-up, then cosine to 10%
            warm = min(1.0, (step + 1) / 20)
            group["lr"] = lr * warm * (0.55 + 0.45 * torch.cos(torch.tensor(step / steps * 3.14159)).item())
        idx = torch.randint(len(examples), (batch,), generator=g)
        u = torch.rand(batch, generator=g, dtype=torch.float64)
        loss = forward_loss(model, tokens[idx], u, torch.rand(tokens[idx].shape, generator=g),
                            None, prompt[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def exact_match(generated_BG: torch.Tensor, examples: list) -> float:
    """Fraction of rows whose tokens up to the first EOD equal the answer (its EOD included)."""
    hits = 0
    for row, e in zip(generated_BG.tolist(), examples):
        hits += row[:len(e.answer)] == e.answer
    return hits / len(examples)
