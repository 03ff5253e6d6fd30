"""Where the time goes, in one process with no DeepSpeed and no gloo: per implementation a full
forward + backward at the per-rank shapes (micro_batch x seq_len), the FFN sublayers alone (the MoE
layers or the dense SwiGLUs, forward + backward on inputs captured from one forward), the trainer's
AdamW step, and the MoE layers' hottest operators."""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import format_table, hottest_operators, median_ms, time_interleaved
from benchmarks.throughput.presets import load_run_config


def build(cfg):
    """(fwd_bwd, ffn_step, optimizer step, captured FFN inputs, parameter count) for one config."""
    from model import DiffusionTransformer
    from trainer.engine.build import build_optimizer
    from trainer.engine.objective import DiffusionObjective
    from trainer.noise import global_batch_noise

    t = cfg.train
    model = DiffusionTransformer(cfg.model_config, seed=t.seed)
    obj = DiffusionObjective(model)
    opt = build_optimizer(list(obj.parameters()), cfg, ds={})   # the trainer's (fused) AdamW
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len), generator=gen)
    u_G, tok_u = global_batch_noise(t.seed, 0, t.micro_batch_size, t.seq_len, True)
    captured = []   # (ffn module, its input, mask ratio, ...) for every block, from one forward
    hooks = [b.ffn.register_forward_pre_hook(lambda m, a: captured.append((m, a[0].detach(), *a[1:])))
             for b in model.blocks]
    obj(tokens, u_G, tok_u)
    for h in hooks:
        h.remove()

    def fwd_bwd():
        for p in obj.parameters():
            p.grad = None
        obj(tokens, u_G, tok_u)["loss"].backward()

    def ffn_step():
        for m, x, *rest in captured:
            x = x.requires_grad_()
            out = m(x, *rest) if rest else m(x)
            (out.hidden.sum() + out.loss if hasattr(out, "hidden") else out.sum()).backward()

    fwd_bwd()   # gradients for the optimizer step to use
    return fwd_bwd, ffn_step, opt.step, captured, sum(p.numel() for p in obj.parameters())


def profile_modules(args, impls) -> list[dict]:
    args = argparse.Namespace(**{**vars(args), "ep": 1})   # every expert in this one process
    torch.set_num_threads(args.threads)
    steps, ffn_layers, params = {}, {}, {}
    for impl in impls:
        cfg = load_run_config(args, impl)
        fwd_bwd, ffn_step, opt_step, ffn_layers[impl], params[impl] = build(cfg)
        steps[f"{impl}/fwd_bwd"], steps[f"{impl}/ffn"], steps[f"{impl}/opt"] = fwd_bwd, ffn_step, opt_step
    times, loads, _ = time_interleaved(steps, warmup=args.profile_warmup, repeat=args.profile_repeat,
                                       device=torch.device("cpu"), max_foreign_cores=args.max_foreign)
    rows = []
    for impl in impls:
        fb, ffn, opt = (median_ms(times[f"{impl}/{k}"]) for k in ("fwd_bwd", "ffn", "opt"))
        rows.append({"impl": impl, "fwd_bwd_ms": fb, "ffn_ms": ffn, "other_ms": fb - ffn, "ffn_share": ffn / fb,
                     "opt_ms": opt, "params_M": params[impl] / 1e6})
    t = cfg.train
    print(f"one process, {args.threads} thread(s), micro-batch {t.micro_batch_size} x {t.seq_len}: "
          f"median of {args.profile_repeat} (other processes: max {max(loads):.2f} cores in a kept round)")
    print(format_table(rows, [("impl", "impl", "s"), ("fwd_bwd_ms", "fwd+bwd ms", ".1f"),
                              ("ffn_ms", "of which FFN ms", ".1f"), ("other_ms", "rest ms", ".1f"),
                              ("ffn_share", "FFN share", ".0%"), ("opt_ms", "AdamW ms", ".1f"),
                              ("params_M", "params M", ".2f")]))
    print("FFN = the MoE layers (router, routing, dispatch, experts, combine, shared expert) or the dense "
          "SwiGLUs, fwd+bwd on the captured inputs; AdamW over all parameters (ZeRO-2 steps half per rank, "
          "and reduces every gradient across ranks: total, not active, parameters)")
    for impl, captured in ffn_layers.items():
        if not hasattr(captured[0][0], "route"):   # dense: no MoE layer to look into
            continue
        table, cores = hottest_operators(steps[f"{impl}/ffn"], args.max_foreign, args.profile_ops)
        print(f"\n{impl}: hottest operators of the MoE layers' fwd+bwd (all {len(captured)} layers, "
              f"5 iterations, self CPU time; other processes used {cores:.2f} cores meanwhile)")
        print(table)
    return rows
