"""Zero-shot multiple choice from a JSON-lines file, in two modes, offline and during training.

    python -m evaluation.multiple_choice RUN_DIR --task FILE.jsonl [--mode likelihood|single_mask]
        [--mc-num 32] [--batch-size 32] [--limit N] [--seed 0] [--json]

Each line: {"question": str (or "context": str, or both), "choices": [str, ...], "answer": index}.

- `likelihood`: the prediction is the choice with the highest Monte-Carlo ELBO given the prompt
  (evaluation/likelihood.py); reports `acc` (summed log-likelihood) and `acc_norm` (divided by the
  choice's length in bytes, as lm-evaluation-harness does).
- `single_mask`: the choices are listed with letter labels, the prompt ends in "Answer:" and one
  mask token, and the prediction is the label whose token has the highest logit there: one
  forward per batch of questions, cheap enough to run every few hundred training steps.

Under data parallelism every rank takes every world-th question and the counts are summed. Under
expert parallelism every forward is an all-to-all whose sizes the ranks derive from shapes, so
every rank also runs the same number of forwards of one fixed shape per task (padding with
repeats whose results it discards). Monte-Carlo noise is seeded per question, so the numbers do
not depend on the number of ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .sample import left_pad
from .inference import expert_parallel, model_device
from .likelihood import elbo_loglik

LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class MCItem:
    prompt: str
    choices: list
    answer: int


def load_mc_jsonl(path: str, limit: Optional[int] = None) -> list:
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            prompt = "\n".join(str(row[k]) for k in ("context", "question") if row.get(k))
            choices, answer = row.get("choices"), row.get("answer")
            if not prompt or not isinstance(choices, list) or len(choices) < 2:
                raise ValueError(f"{path}:{n}: need 'question' or 'context' and a list of >= 2 'choices'")
            if not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise ValueError(f"{path}:{n}: 'answer' must be an index into choices, got {answer!r}")
            if len(choices) > len(LABELS):
                raise ValueError(f"{path}:{n}: at most {len(LABELS)} choices")
            items.append(MCItem(prompt, [str(c) for c in choices], answer))
            if limit and len(items) == limit:
                break
    if not items:
        raise ValueError(f"{path}: no questions")
    return items


# ---- prompt formats (also what a model is trained on for these tasks) ----------------------------
def continuation(prompt: str, choice: str) -> str:
    """The choice as it follows the prompt: separated by one space unless either side has one."""
    return choice if (not prompt or prompt[-1].isspace() or choice[:1].isspace()) else " " + choice


def single_mask_prompt(item: MCItem) -> str:
    lines = [item.prompt] + [f"{LABELS[i]}. {c}" for i, c in enumerate(item.choices)]
    return "\n".join(lines) + "\nAnswer:"


def label_token_ids(tok, n: int) -> list:
    """The single token of each label as it follows "Answer:" (" A" if that is one token, else "A")."""
    ids = []
    for label in LABELS[:n]:
        for text in (" " + label, label):
            enc = tok.encode(text)
            if len(enc) == 1:
                ids.append(enc[0])
                break
        else:
            raise ValueError(f"label {label!r} is not a single token in this tokenizer; single_mask mode needs it")
    return ids


# ---- the two modes --------------------------------------------------------------------------------
def likelihood_inputs(model, tok, item: MCItem) -> tuple:
    """(context ids, [continuation ids per choice]), the context cut from the left to fit."""
    conts = [tok.encode(continuation(item.prompt, c)) for c in item.choices]
    ctx = tok.encode(item.prompt)
    room = model.cfg.model.max_seq_len - max(len(c) for c in conts)
    return ctx[max(0, len(ctx) - room):], conts


def single_mask_inputs(model, tok, item: MCItem) -> list:
    """The labelled prompt's ids (cut from the left to fit) followed by one mask token."""
    m = model.cfg.model
    ids = tok.encode(single_mask_prompt(item))
    return ids[max(0, len(ids) - (m.max_seq_len - 1)):] + [m.mask_id]


def likelihood_scores(model, tok, item: MCItem, mc_num: int, batch_size: int, g, pad_choices: int = 0,
                      shape: Optional[tuple] = None) -> list:
    """ELBO log-likelihood of each choice. Under expert parallelism, `pad_choices` repeats the last
    choice (results dropped) and `shape` fixes every forward's shape, so that all ranks run the
    same forwards whatever their questions."""
    ctx, conts = likelihood_inputs(model, tok, item)
    scores = [elbo_loglik(model, ctx, c, mc_num, batch_size, g, shape).loglik for c in conts]
    for _ in range(pad_choices - len(conts)):
        elbo_loglik(model, ctx, conts[-1], mc_num, batch_size, g, shape)
    return scores


@torch.no_grad()
def single_mask_predictions(model, tok, items: Sequence[MCItem], shape: Optional[tuple] = None) -> list:
    """Predicted choice index per item, from one forward over the batch (padded to `shape` =
    (rows, length) if given, the extra rows copies of the first)."""
    m = model.cfg.model
    labels = torch.tensor(label_token_ids(tok, max(len(it.choices) for it in items)))
    prompts = [single_mask_inputs(model, tok, it) for it in items]
    if shape is not None:
        prompts += [prompts[0]] * (shape[0] - len(prompts))
    x_BL, valid_BL = left_pad(prompts, m.pad_id, shape[1] if shape else None)
    dev = model_device(model)
    x_BL, valid_BL = x_BL.to(dev), valid_BL.to(dev)
    last_BL = torch.zeros_like(valid_BL)
    last_BL[:, -1] = True
    r_B = 1.0 / valid_BL.sum(1).to(torch.float32)   # one masked position: r = 1/L, as in pretraining
    pad_valid = None if bool(valid_BL.all()) and shape is None else valid_BL
    logits_BV = model(x_BL, r_B, pad_valid, logits_mask_BL=last_BL).logits
    scores_BC = logits_BV[:len(items), labels.to(dev)].float().cpu()
    return [int(s[:len(it.choices)].argmax()) for it, s in zip(items, scores_BC)]


def fixed_shape(model, tok, items: Sequence[MCItem], mode: str, mc_num: int, batch_size: int):
    """(rows, length) every forward of this task gets under expert parallelism, from all the
    questions (each rank sees them all, so every rank computes the same shape); else None."""
    if not expert_parallel(model):
        return None
    if mode == "single_mask":
        return batch_size, max(len(single_mask_inputs(model, tok, it)) for it in items)
    lengths = [len(ctx) + len(c) for it in items for ctx, conts in [likelihood_inputs(model, tok, it)] for c in conts]
    return min(batch_size, mc_num), max(lengths)


def dist_info(rank: Optional[int], world: Optional[int]) -> tuple:
    import torch.distributed as dist
    if rank is not None and world is not None:
        return rank, world
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(n: int, rank: int, world: int) -> tuple[list, int]:
    """(indices of this rank's items, how many are real): items rank, rank + world, ..., padded
    with repeats of item 0 so every rank runs the same number of forwards (collectives inside)."""
    idx = list(range(rank, n, world))
    real = len(idx)
    return idx + [0] * (-(-n // world) - real), real


def evaluate_mc(model, tok, items: Sequence[MCItem], mode: str = "likelihood", mc_num: int = 32,
                batch_size: int = 32, seed: int = 0, rank: Optional[int] = None,
                world: Optional[int] = None) -> dict:
    """{"acc": ..., ["acc_norm": ...,] "n": questions}; the same on every rank."""
    if mode not in ("likelihood", "single_mask"):
        raise ValueError(f"mode={mode!r} must be likelihood or single_mask")
    rank, world = dist_info(rank, world)
    was_training = model.training
    model.eval()
    idx, real = rank_share(len(items), rank, world)
    mine = [items[i] for i in idx]
    correct = torch.zeros(3, dtype=torch.float64)   # acc, acc_norm, n
    shape = fixed_shape(model, tok, items, mode, mc_num, batch_size)
    if mode == "likelihood":
        n_max = max(len(it.choices) for it in items) if world > 1 else 0
        for i, it in enumerate(mine):
            # noise from (seed, question) alone: the result does not depend on the number of ranks
            g = torch.Generator().manual_seed(seed * 1_000_003 + idx[i])
            s = likelihood_scores(model, tok, it, mc_num, batch_size, g, n_max, shape)
            if i < real:
                norm = [v / max(1, len(c.encode("utf-8"))) for v, c in zip(s, it.choices)]
                correct += torch.tensor([max(range(len(s)), key=s.__getitem__) == it.answer,
                                         max(range(len(s)), key=norm.__getitem__) == it.answer, 1.0])
    else:
        for i in range(0, len(idx), batch_size):
            preds = single_mask_predictions(model, tok, mine[i:i + batch_size], shape)
            for j, p in enumerate(preds):
                if i + j < real:
                    hit = float(p == mine[i + j].answer)
                    correct += torch.tensor([hit, hit, 1.0])
    if world > 1:
        import torch.distributed as dist
        from trainer.distributed import comm_device
        correct = correct.to(comm_device())
        dist.all_reduce(correct)
        correct = correct.cpu()
    model.train(was_training)
    acc, acc_norm, n = correct.tolist()
    out = {"acc": acc / max(n, 1), "n": int(n)}
    if mode == "likelihood":
        out["acc_norm"] = acc_norm / max(n, 1)
    return out


# ---- command line --------------------------------------------------------------------------------
def main(argv=None) -> int:
    from evaluation.loading import load_run
    p = argparse.ArgumentParser(description="Zero-shot multiple-choice accuracy of an ecdlm run.")
    p.add_argument("run", help="run directory or checkpoint directory")
    p.add_argument("--task", required=True, help="JSON lines: question/context, choices, answer")
    p.add_argument("--mode", choices=("likelihood", "single_mask"), default="likelihood")
    p.add_argument("--mc-num", type=int, default=32, help="Monte-Carlo samples per choice (likelihood mode)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    model, _, tok = load_run(args.run, args.device)
    res = evaluate_mc(model, tok, load_mc_jsonl(args.task, args.limit), args.mode, args.mc_num,
                      args.batch_size, args.seed, 0, 1)
    res = {"task": os.path.basename(args.task), "mode": args.mode, **res}
    print(json.dumps(res) if args.json else "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
