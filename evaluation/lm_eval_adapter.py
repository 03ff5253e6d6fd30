"""lm-evaluation-harness model `ecdlm`: log-likelihoods by the Monte-Carlo ELBO, generation by the
iterative-unmasking sampler.

    python -m evaluation.lm_eval_adapter --model ecdlm --model_args path=RUN_DIR[,mc_num=64,...] \
        --tasks TASKS [any other lm_eval option]

is lm_eval's own command line with this model registered (lm_eval has no plugin discovery, so a
bare `lm_eval --model ecdlm` cannot find it; in Python, `import evaluation.lm_eval_adapter` before
`lm_eval.simple_evaluate(model="ecdlm", ...)` does the same).

model_args: path (run or checkpoint directory, required), device, mc_num (ELBO samples per
request, 64), mc_batch_size (rows per forward, 32), greedy_check (true: also decide lm-eval's
"is greedy" by unmasking the continuation one most-confident token at a time; false: report
False, which saves L forwards per request), gen_length (default max_gen_toks, 128),
block_length (32), steps_per_token (1.0), remasking (low_confidence), cfg_scale (0), seed (0),
decoding (fixed or threshold), threshold (0.9), cache (none, prefix or dual; docs/sampling.md),
early_stop (false; true: stop once every row has committed end-of-text, and cut each completion
there), tokenizer (a prepared data directory; default the run's).

A lower bound replaces the exact log-likelihood, so loglikelihood-based accuracies rank choices
by their ELBO, as LLaDA reports them; perplexity tasks (loglikelihood_rolling) give a bound.
"""
from __future__ import annotations

import math
import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .sample import SampleConfig, generate, truncate_at_stops
from .inference import model_device
from evaluation.loading import load_run
from .likelihood import elbo_loglik


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


@register_model("ecdlm")
class ECDLM(LM):
    def __init__(self, path: str, device: str = None, tokenizer: str = None, batch_size=1, max_batch_size=None,
                 **options):
        super().__init__()
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"   # lm_eval's default is cuda
        model, _, tok = load_run(str(path), device, tokenizer)
        self._configure(model, tok, batch_size, **options)

    @classmethod
    def from_model(cls, model, tokenizer, batch_size=1, **options) -> "ECDLM":
        """An adapter around a model already in memory (e.g. inside a training job)."""
        self = cls.__new__(cls)
        LM.__init__(self)
        self._configure(model, tokenizer, batch_size, **options)
        return self

    def _configure(self, model, tok, batch_size, mc_num=64, mc_batch_size=32, greedy_check=True,
                   gen_length=128, block_length=32, steps_per_token=1.0, remasking="low_confidence",
                   cfg_scale=0.0, seed=0, decoding="fixed", threshold=0.9, cache="none", early_stop=False) -> None:
        self.model, self.tok = model, tok
        self._device = model_device(model)
        self.mc_num, self.mc_batch = int(mc_num), int(mc_batch_size)
        self.greedy_check = _bool(greedy_check)
        self.gen_length, self.block_length = int(gen_length), int(block_length)
        self.steps_per_token, self.remasking, self.cfg_scale = float(steps_per_token), remasking, float(cfg_scale)
        self.gen_batch = int(batch_size) if str(batch_size).isdigit() else 1   # "auto" -> 1
        self.max_len = model.cfg.model.max_seq_len
        self.seed = int(seed)
        self.decoding, self.threshold, self.cache = str(decoding), float(threshold), str(cache)
        self.early_stop = _bool(early_stop)
        self._sample_config(self.block_length, 0.0).validate()   # a bad option fails here, naming itself
        self.g = torch.Generator().manual_seed(self.seed)

    # ---- log-likelihood ------------------------------------------------------------------------
    def _fit(self, ctx: list, cont: list) -> tuple:
        """Keep the continuation whole (its last max_len-1 tokens at worst) and the end of the context."""
        cont = cont[-(self.max_len - 1):]
        return ctx[max(0, len(ctx) - (self.max_len - len(cont))):], cont

    def _score(self, ctx: list, cont: list, greedy: bool) -> tuple:
        ctx, cont = self._fit(ctx, cont)
        est = elbo_loglik(self.model, ctx, cont, self.mc_num, self.mc_batch, self.g)
        is_greedy = False
        if greedy and cont:
            sc = SampleConfig(gen_length=len(cont), steps=len(cont), seed=self.seed)
            is_greedy = generate(self.model, [ctx], sc).generated_BG[0].tolist() == cont
        return est.loglik, is_greedy

    def loglikelihood(self, requests) -> list:
        out = []
        for req in requests:
            context, continuation = req.args
            out.append(self._score(self.tok.encode(context), self.tok.encode(continuation), self.greedy_check))
        return out

    def loglikelihood_rolling(self, requests) -> list:
        """Sum of ELBOs over disjoint windows of at most max_seq_len tokens, each window given the
        preceding tokens as context (lm-eval's rolling windows, with end-of-document as prefix)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        out = []
        for req in requests:
            ids = self.tok.encode(req.args[0])
            # max_len - 1 per window: with its one-token context a window then fits the model
            windows = get_rolling_token_windows(ids, self.tok.eod_id, self.max_len - 1, 1)
            out.append(sum(self._score(*make_disjoint_window(w), False)[0] for w in windows))
        return out

    # ---- generation ----------------------------------------------------------------------------
    def _sample_config(self, max_gen_toks: int, temperature: float) -> SampleConfig:
        block = min(self.block_length, max_gen_toks)
        gen = block * math.ceil(max_gen_toks / block)
        blocks = gen // block
        steps = blocks * max(1, math.ceil(gen * self.steps_per_token / blocks))
        return SampleConfig(gen_length=gen, steps=steps, block_length=block, temperature=temperature,
                            remasking=self.remasking, cfg_scale=self.cfg_scale, seed=self.seed,
                            decoding=self.decoding, threshold=self.threshold, cache=self.cache,
                            eod_id=self.tok.eod_id if self.early_stop else None)

    def generate_until(self, requests) -> list:
        out = []
        for i in range(0, len(requests), self.gen_batch):
            batch = requests[i:i + self.gen_batch]
            kw = dict(batch[0].args[1] or {})   # lm-eval groups requests of one task: same kwargs
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", True) else 0.0
            sc = self._sample_config(int(kw.get("max_gen_toks", self.gen_length)), temperature)
            room = self.max_len - sc.gen_length
            prompts = [self.tok.encode(r.args[0])[-room:] if room > 0 else [] for r in batch]
            gen = generate(self.model, prompts, sc, self.g)
            for row in gen.generated_BG.tolist():
                if self.early_stop and self.tok.eod_id in row:   # what follows it was never decoded
                    row = row[:row.index(self.tok.eod_id)]
                out.append(truncate_at_stops(self.tok.decode(row), until))
        return out


def main(argv=None) -> int:
    """lm_eval's command line, with `ecdlm` registered."""
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
