"""Sampling by iterative unmasking (LLaDA-style), for expert-choice, token-choice and dense models.

    python -m evaluation.sample RUN_DIR --prompt "def add(a, b):" [--prompt-file F] [--gen-length 64]
        [--steps 64] [--block-length 32] [--temperature 0] [--remasking low_confidence|random]
        [--cfg-scale 0] [--decoding fixed|threshold] [--threshold 0.9] [--cache none|prefix|dual]
        [--early-stop] [--batch-size 8] [--seed 0] [--json] [--device cpu]

The sequence starts as the prompt followed by `gen_length` mask tokens. The generated region is
split into blocks of `block_length` that are filled left to right (semi-autoregressive); the
`steps` denoising steps are split evenly across blocks, and each step commits
ceil(masked-in-block / steps-left-in-block) positions: those whose proposed token is most
probable (`low_confidence` remasking: the least confident stay masked) or a random subset
(`random`). With `--decoding threshold` a step instead commits every masked position of the block
whose confidence is at least tau (and at least the most confident one), so a block takes as many
steps as it needs (`steps` is then unused). Proposals are argmax at temperature 0, else Gumbel-max samples of softmax(logits / T)
in float64. With classifier-free guidance, the unconditional branch sees the prompt replaced by
mask tokens and logits = uncond + (scale + 1) (cond - uncond).

Caches (docs/sampling.md; Fast-dLLM's): `prefix` records every layer's keys and values with a full
forward at a block's first step and then computes only the block and what follows it, reading the
prompt and finished blocks from the record; `dual` computes only the block, reading the suffix from
the record too. The record is dropped and rebuilt at every block boundary. In an expert-choice
model the computed positions compete among themselves for each expert's capacity
c_b = floor(A k_b / E), A computed positions, k_b the schedule's k at the whole canvas's mask ratio:
every expert still takes exactly c_b of them. `--early-stop` ends generation once every row has
committed end-of-text with nothing masked before it (the rest are filled with end-of-text).

Each forward passes the current mask ratio r_b so an expert-choice model gets the capacity its
schedule gives sequences in that state, by the rule the model was trained with
(evaluation/inference.py): masked / all non-pad positions after pretraining, masked / generated
positions after supervised fine-tuning.

Legend: B batch, P prompt length (left-padded), G generated length, L = P + G, V vocab, N rows.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from model.kv_cache import BlockKVCache

from .inference import any_rank, model_device, model_mask_ratio


@dataclass(kw_only=True)
class SampleConfig:
    gen_length: int = 64
    steps: int = 64
    block_length: Optional[int] = None   # None: one block spanning the whole generation
    temperature: float = 0.0
    remasking: str = "low_confidence"    # or "random"
    cfg_scale: float = 0.0               # 0: no guidance (one forward per step)
    seed: int = 0
    decoding: str = "fixed"              # or "threshold": commit every position with confidence >= threshold
    threshold: float = 0.9
    cache: str = "none"                  # or "prefix", "dual" (block KV caches)
    eod_id: Optional[int] = None         # set: stop once every row has committed it (early stop)

    @property
    def block(self) -> int:
        return self.block_length or self.gen_length

    def validate(self) -> None:
        if self.gen_length < 1 or self.steps < 1:
            raise ValueError(f"gen_length={self.gen_length} and steps={self.steps} must be >= 1")
        if self.gen_length % self.block:
            raise ValueError(f"block_length={self.block} must divide gen_length={self.gen_length}")
        blocks = self.gen_length // self.block
        if self.steps % blocks:
            raise ValueError(f"steps={self.steps} must be a multiple of the number of blocks "
                             f"gen_length/block_length={blocks}")
        if self.remasking not in ("low_confidence", "random"):
            raise ValueError(f"remasking={self.remasking!r} must be low_confidence or random")
        if self.temperature < 0 or self.cfg_scale < 0:
            raise ValueError("temperature and cfg_scale must be >= 0")
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding={self.decoding!r} must be one of {', '.join(DECODINGS)}")
        if self.cache not in CACHES:
            raise ValueError(f"cache={self.cache!r} must be one of {', '.join(CACHES)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be in [0, 1] (a probability)")
        if self.decoding == "threshold" and self.remasking != "low_confidence":
            raise ValueError("decoding=threshold commits by the model's confidence: it needs "
                             f"remasking=low_confidence, not {self.remasking!r}")


DECODINGS = ("fixed", "threshold")
CACHES = ("none", "prefix", "dual")


@dataclass
class Generation:
    tokens_BL: torch.Tensor        # left-padded prompts followed by the generated tokens
    valid_BL: torch.Tensor         # False at left padding
    gen_start: int                 # column of the first generated token (= P)
    commit_step_BL: torch.Tensor   # denoising step that committed each generated position; -1 elsewhere
    forward_passes: int            # model calls (a guided step is one call on 2B rows): the NFE
    seconds: float

    @property
    def tokens_committed(self) -> int:
        """Positions a denoising step committed (not those an early stop filled)."""
        return int((self.commit_step_BL >= 0).sum())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_committed / max(self.seconds, 1e-9)

    @property
    def generated_BG(self) -> torch.Tensor:
        return self.tokens_BL[:, self.gen_start:]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None):
    """([B, P] tokens, [B, P] valid): prompts right-aligned, so every generated region starts in
    the same column; with a key-padding mask and RoPE (relative positions) the padding changes
    nothing a token sees. P = the longest prompt, or `length`."""
    P = max(max(len(p) for p in prompts), length or 0)
    x_BP = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid_BP = torch.zeros((len(prompts), P), dtype=torch.bool)
    for b, p in enumerate(prompts):
        if len(p):
            x_BP[b, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            valid_BP[b, P - len(p):] = True
    return x_BP, valid_BP


def commit_counts(masked_in_block_B: torch.Tensor, steps_left: int) -> torch.Tensor:
    """Tokens to commit this step: ceil(masked / steps left), so a block is done on its last step
    and the counts differ by at most one across steps (the earlier steps take the remainder)."""
    return torch.div(masked_in_block_B + steps_left - 1, steps_left, rounding_mode="floor")


def propose(logits_NV: torch.Tensor, temperature: float, generator: Optional[torch.Generator]):
    """(token, confidence) per row: argmax (T = 0) or Gumbel-max sample of softmax(logits / T),
    in float64 so that low-probability tokens keep distinct noise; confidence is the model's
    probability of the proposed token."""
    logits = logits_NV.to(torch.float64)
    if temperature > 0:
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
        token_N = (logits / temperature + gumbel).argmax(-1)
    else:
        token_N = logits.argmax(-1)
    conf_N = torch.softmax(logits, -1).gather(-1, token_N[:, None])[:, 0]
    return token_N, conf_N


def top_k_per_row(score_BL: torch.Tensor, k_B: torch.Tensor) -> torch.Tensor:
    """Bool [B, L]: the k_b highest scores of each row (ties go to the leftmost position)."""
    order_BL = score_BL.argsort(dim=1, descending=True, stable=True)
    rank_BL = torch.empty_like(order_BL)
    rank_BL.scatter_(1, order_BL, torch.arange(score_BL.shape[1], device=score_BL.device).expand_as(order_BL))
    return rank_BL < k_B[:, None]


def guided_logits(model, x_BL, valid_BL, prompt_BL, rows_BL, cfg_scale: float, cache=None) -> torch.Tensor:
    """[N, V] logits at the positions `rows_BL`, with classifier-free guidance when cfg_scale > 0.
    `cache` (model.kv_cache.BlockKVCache) is handed to the model: with a span, `rows_BL` must lie in it."""
    mask_id = model.cfg.model.mask_id
    pad_valid = None if bool(valid_BL.all()) else valid_BL   # None keeps the fast unpadded path
    r_B = model_mask_ratio(model, x_BL, valid_BL, prompt_BL)
    kw = {} if cache is None else {"cache": cache}   # a stand-in model need not know caches
    if cfg_scale <= 0:
        return model(x_BL, r_B, pad_valid, logits_mask_BL=rows_BL, **kw).logits
    # unconditional branch: the prompt is masked too
    x_un = torch.where(prompt_BL, torch.full_like(x_BL, mask_id), x_BL)
    r_un = model_mask_ratio(model, x_un, valid_BL, prompt_BL)
    both_V = pad_valid if pad_valid is None else torch.cat([pad_valid, pad_valid])
    logits = model(torch.cat([x_BL, x_un]), torch.cat([r_B, r_un]), both_V,
                   logits_mask_BL=torch.cat([rows_BL, rows_BL]), **kw).logits
    cond, uncond = logits.chunk(2)
    return uncond + (cfg_scale + 1.0) * (cond - uncond)


@dataclass
class Canvas:
    """The sequence being filled and which of its positions are what."""
    x_BL: torch.Tensor          # tokens; mask ids where still undecided
    valid_BL: torch.Tensor      # False at left padding
    prompt_BL: torch.Tensor     # the prompt's own positions (never changed)
    maskable_BL: torch.Tensor   # the generated region
    commit_BL: torch.Tensor     # step that committed each generated position, -1 elsewhere


def make_canvas(prompts: Sequence[Sequence[int]], G: int, pad_id: int, mask_id: int, dev) -> Canvas:
    prompt_BP, pvalid_BP = left_pad(prompts, pad_id)
    B, P = prompt_BP.shape
    x_BL = torch.cat([prompt_BP, torch.full((B, G), mask_id, dtype=torch.long)], 1).to(dev)
    valid_BL = torch.cat([pvalid_BP, torch.ones(B, G, dtype=torch.bool)], 1).to(dev)
    prompt_BL = torch.zeros_like(valid_BL)
    prompt_BL[:, :P] = pvalid_BP.to(dev)
    return Canvas(x_BL, valid_BL, prompt_BL, valid_BL & ~prompt_BL, torch.full_like(x_BL, -1))


def denoise_step(model, c: Canvas, todo_BL: torch.Tensor, k_B: Optional[torch.Tensor], step: int,
                 sc: SampleConfig, g: torch.Generator, cache=None) -> None:
    """Propose a token at every position in `todo_BL` and commit the k_b best of each row (k_B
    None: every one whose confidence reaches sc.threshold, and each row's best)."""
    logits_NV = guided_logits(model, c.x_BL, c.valid_BL, c.prompt_BL, todo_BL, sc.cfg_scale, cache)
    logits_NV[:, model.cfg.model.mask_id] = float("-inf")   # never propose the mask token itself
    token_N, conf_N = propose(logits_NV, sc.temperature, g)
    if sc.remasking == "random":
        conf_N = torch.rand(conf_N.shape, generator=g, dtype=torch.float64, device=conf_N.device)
    score_BL = torch.full(c.x_BL.shape, float("-inf"), dtype=torch.float64, device=conf_N.device)
    score_BL[todo_BL] = conf_N
    if k_B is None:   # threshold: each row's best (a step always commits one) and all confident ones
        commit_BL = (top_k_per_row(score_BL, todo_BL.any(1).long()) | (score_BL >= sc.threshold)) & todo_BL
    else:
        commit_BL = top_k_per_row(score_BL, k_B) & todo_BL
    proposal_BL = c.x_BL.clone()
    proposal_BL[todo_BL] = token_N
    c.x_BL = torch.where(commit_BL, proposal_BL, c.x_BL)
    c.commit_BL[commit_BL] = step


def cache_for_step(sc: SampleConfig, cache: Optional[BlockKVCache], first_step: bool, start: int, end: int,
                   L: int):
    """The cache a step's forward uses: a fresh recording at a block's first step (the old record
    is stale: the previous block's tokens changed), else the record with the span to compute."""
    if sc.cache == "none":
        return None
    if first_step:
        return BlockKVCache()
    cache.span = (start, end if sc.cache == "dual" else L)   # prefix: the block and all after it
    return cache


def early_stopped(c: Canvas, eod_id: int, mask_id: int) -> bool:
    """True when every row holds a committed end-of-text with no masked position before it, so
    no later step can change its text up to there."""
    gen_BL = c.maskable_BL
    eod_BL = (c.x_BL == eod_id) & gen_BL
    before_BL = eod_BL.cumsum(1) == 0                  # columns before the row's first end-of-text
    open_B = ((c.x_BL == mask_id) & gen_BL & before_BL).any(1)
    return bool((eod_BL.any(1) & ~open_B).all())


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], sc: SampleConfig,
             generator: Optional[torch.Generator] = None) -> Generation:
    """Fill `sc.gen_length` tokens after each prompt (token id lists, batched together). Under
    expert parallelism every rank must call it with the same shapes and settings: the ranks then
    agree on every step taken (see any_rank)."""
    sc.validate()
    m = model.cfg.model
    P = max(len(p) for p in prompts)
    if P + sc.gen_length > m.max_seq_len:
        raise ValueError(f"prompt ({P} tokens) + gen_length={sc.gen_length} exceeds model.max_seq_len={m.max_seq_len}")
    dev = model_device(model)
    g = generator or torch.Generator(device=dev).manual_seed(sc.seed)
    t0 = time.perf_counter()
    c = make_canvas(prompts, sc.gen_length, m.pad_id, m.mask_id, dev)
    L = c.x_BL.shape[1]
    col_L = torch.arange(L, device=dev)
    blocks = sc.gen_length // sc.block
    per_block = sc.steps // blocks
    calls, step, cache, stopped = 0, 0, None, False
    for blk in range(blocks):   # left to right; each block finished before the next starts
        start, end = P + blk * sc.block, P + (blk + 1) * sc.block
        in_block_L = (col_L >= start) & (col_L < end)
        s = 0
        while sc.decoding == "threshold" or s < per_block:
            todo_BL = (c.x_BL == m.mask_id) & c.maskable_BL & in_block_L & (not stopped)
            # threshold: as many steps as the slowest row needs; under expert parallelism a rank
            # whose rows are done (or stopped early) runs the others' forwards, committing nothing
            k_B = commit_counts(todo_BL.sum(1), per_block - s) if sc.decoding == "fixed" else None
            if not any_rank(model, bool(todo_BL.any())):
                break
            cache = cache_for_step(sc, cache, s == 0, start, end, L)
            denoise_step(model, c, todo_BL, k_B, step, sc, g, cache)
            calls, s, step = calls + 1, s + 1, step + 1
            if sc.eod_id is not None:
                if not stopped and early_stopped(c, sc.eod_id, m.mask_id):
                    stopped = True   # this canvas is final: the rest is end-of-text
                    c.x_BL = torch.where((c.x_BL == m.mask_id) & c.maskable_BL, torch.full_like(c.x_BL, sc.eod_id), c.x_BL)
                if not any_rank(model, not stopped):   # every rank has stopped
                    return Generation(c.x_BL, c.valid_BL, P, c.commit_BL, calls, time.perf_counter() - t0)
        if sc.decoding == "fixed":
            step = (blk + 1) * per_block   # today's numbering: a block's steps are a fixed range
    return Generation(c.x_BL, c.valid_BL, P, c.commit_BL, calls, time.perf_counter() - t0)


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """Cut `text` at the earliest occurrence of any stop string."""
    cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:cut]


# ---- command line -------------------------------------------------------------------------------
def read_prompts(args) -> list:
    """--prompt values, then --prompt-file lines: a JSON object line gives its "prompt" (or
    "text") field, any other non-empty line is a prompt as it stands."""
    prompts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file) as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    row = json.loads(line)
                    if "prompt" not in row and "text" not in row:
                        raise ValueError(f"{args.prompt_file}:{n}: JSON line needs a 'prompt' field")
                    line = row.get("prompt", row.get("text"))
                prompts.append(line)
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT or --prompt-file FILE")
    return prompts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sample from a trained ecdlm run by iterative unmasking.")
    p.add_argument("run", help="run directory (newest checkpoint) or a checkpoint directory")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--prompt-file", help="one prompt per line, or JSON lines with a 'prompt' field")
    p.add_argument("--gen-length", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block (default: gen-length)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = argmax, deterministic")
    p.add_argument("--remasking", choices=("low_confidence", "random"), default="low_confidence")
    p.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale (0 = off)")
    p.add_argument("--decoding", choices=DECODINGS, default="fixed",
                   help="fixed: steps/blocks tokens per step; threshold: every position with confidence >= --threshold")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence that commits a position (threshold decoding)")
    p.add_argument("--cache", choices=CACHES, default="none", help="block KV cache (docs/sampling.md)")
    p.add_argument("--early-stop", action="store_true",
                   help="stop once every prompt has committed end-of-text (the rest is filled with it)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", help="prepared data directory holding tokenizer.model (default: the run's)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt instead of text, with its call's nfe and tokens_per_s")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from evaluation.loading import load_run
    args = parse_args(argv)
    sc = SampleConfig(gen_length=args.gen_length, steps=args.steps or args.gen_length,
                      block_length=args.block_length, temperature=args.temperature, remasking=args.remasking,
                      cfg_scale=args.cfg_scale, seed=args.seed, decoding=args.decoding,
                      threshold=args.threshold, cache=args.cache)
    try:
        sc.validate()
        prompts = read_prompts(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        model, cfg, tok = load_run(args.run, args.device, args.tokenizer)
    except (ValueError, OSError) as err:   # CheckpointError, ConfigError, DataError: the path or file is named
        print(f"error: {err}", file=sys.stderr)
        return 2
    g = torch.Generator(device=model_device(model)).manual_seed(args.seed)
    if args.early_stop:
        sc.eod_id = tok.eod_id
    calls, seconds, n_tokens = 0, 0.0, 0
    for i in range(0, len(prompts), args.batch_size):
        batch = prompts[i:i + args.batch_size]
        out = generate(model, [tok.encode(p) for p in batch], sc, g)
        calls, seconds = calls + out.forward_passes, seconds + out.seconds
        n_tokens += out.tokens_committed
        for prompt, row in zip(batch, out.generated_BG.tolist()):
            text = tok.decode(row)
            # the ids too: the generated region as committed (past an end-of-document as well);
            # nfe and tokens_per_s are of the generate call this prompt was batched in
            print(json.dumps({"prompt": prompt, "completion": text, "completion_ids": row, "nfe": out.forward_passes,
                              "tokens_per_s": round(out.tokens_per_s, 3)}) if args.json else
                  f"=== prompt: {prompt!r}\n{prompt}{text}\n", flush=True)
    print(f"[{cfg.moe.router}] {len(prompts)} prompts, {calls} forward passes, {n_tokens} tokens in "
          f"{seconds:.2f} s ({n_tokens / max(seconds, 1e-9):,.1f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
