"""Converting an autoregressive MoE into an expert-choice diffusion LM beats training that DLM from
scratch (issue 23; docs/convert.md).

    .venv/bin/python benchmarks/convert_demo.py                     # ~10-15 min on a shared 2-core CPU
    .venv/bin/python benchmarks/convert_demo.py --ar-steps 4 --dlm-steps 4 --eval-every 2 --toy

1. Pretrain a tiny Qwen3-MoE-shaped autoregressive model with transformers' own Qwen3MoeForCausalLM
   and its own next-token loss on the embedded corpus (data/default, `make setup`): a plain
   PyTorch loop, AdamW.
2. save_pretrained (safetensors), then `python -m evaluation.hf import DIR RUN --mask-id 3` (the
   corpus tokenizer's <|mask|>, a row the AR model never saw as input or target).
3. Convert: the imported run's config with model.attention=bidirectional moe.router=expert_choice
   (the router weights kept), loaded as `init.from` loads it; continue with the diffusion objective.
4. Beside it, the same expert-choice DLM from scratch (ecdlm's own initialization), with the same
   batches, noise, optimizer and schedule.
Both report validation ELBO (the trainer's own evaluate(): a fixed grid of mask ratios, fixed
noise) against diffusion steps. Both DLM runs are in-process (one process, no DeepSpeed): the
model, loss and validation are the trainer's own; only the engine is left out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import machine_info, machine_line  # noqa: E402


def read_split(data: Path, split: str) -> np.ndarray:
    meta = json.loads((data / split / "meta.json").read_text())
    return np.concatenate([np.fromfile(data / split / s["file"], dtype=meta["dtype"]) for s in meta["shards"]])


def windows(stream: np.ndarray, seq_len: int, n: int, g: torch.Generator) -> torch.Tensor:
    """n random windows of the token stream, [n, seq_len] int64."""
    start = torch.randint(0, len(stream) - seq_len - 1, (n,), generator=g).numpy()
    return torch.from_numpy(np.stack([stream[s:s + seq_len].astype(np.int64) for s in start]))


def ar_config(vocab: int, args):
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(vocab_size=vocab, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
                          num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=args.d_model // 4, moe_intermediate_size=args.expert_hidden,
                          num_experts=args.experts, num_experts_per_tok=args.k, norm_topk_prob=True,
                          max_position_embeddings=args.seq_len, pad_token_id=0, eos_token_id=2,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          router_aux_loss_coef=0.01, output_router_logits=True)


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    import math
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def pretrain_ar(train: np.ndarray, vocab: int, out: Path, args) -> list:
    """transformers' model and loss (next-token CE + its router balance loss), plain AdamW loop."""
    from transformers import Qwen3MoeForCausalLM
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(ar_config(vocab, args)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed + 1)
    log = []
    for step in range(args.ar_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.ar_steps, args.lr, args.warmup)
        x = windows(train, args.seq_len, args.batch, g)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.ar_steps - 1:
            log.append({"step": step, "ar_loss": loss.item()})
            print(f"  AR step {step:4d}  next-token loss {log[-1]['ar_loss']:.3f}", flush=True)
    model.save_pretrained(str(out))
    return log


def dlm_config(run_cfg: Path):
    """The imported run's config with the conversion's overrides: bidirectional, expert choice."""
    from rundir.config import load_config
    return load_config(str(run_cfg), ("model.attention=bidirectional", "moe.router=expert_choice",
                                      "moe.z_loss_coef=0.0", "moe.aux_loss_coef=0.0"))


def train_dlm(name: str, cfg, init_run, train: np.ndarray, val: list, args, steps: int = None) -> list:
    """The diffusion objective in a plain loop; init_run: the imported run (init.from) or None."""
    steps = args.dlm_steps if steps is None else steps
    from model import DiffusionTransformer, forward_loss
    from model.diffusion import stratified_u
    from trainer.validation import evaluate
    model = DiffusionTransformer(cfg.model_config, seed=args.seed)
    if init_run is not None:
        from trainer.init_weights import load_initial_weights
        load_initial_weights(model, cfg, str(init_run))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.dlm_lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed + 2)   # the same batches and noise for both runs
    log = []
    for step in range(steps + 1):
        if step % args.eval_every == 0 or step == steps:
            elbo = evaluate(model, val, cfg, 0, 1, "cpu")["val/loss"]
            log.append({"step": step, "val_elbo": elbo})
            print(f"  {name:10s} step {step:4d}  val ELBO {elbo:.3f}", flush=True)
        if step == steps:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.dlm_lr, args.warmup)
        x = windows(train, args.seq_len, args.batch, g)
        u, token_u = stratified_u(args.batch, g), torch.rand(x.shape, generator=g)
        loss = forward_loss(model, x, u, token_u).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return log


def steps_value(log: list, step: int):
    """The val ELBO at the last evaluation at or before `step`."""
    return [r["val_elbo"] for r in log if r["step"] <= step][-1]


def steps_to_reach(log: list, target: float):
    return next((r["step"] for r in log if r["val_elbo"] <= target), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "default"))
    p.add_argument("--work", default=str(ROOT / "runs" / "convert_demo"))
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/convert_demo_<date>.json)")
    p.add_argument("--ar-steps", type=int, default=200)
    p.add_argument("--dlm-steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-hidden", type=int, default=64)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dlm-lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--val-batches", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compute-matched", action=argparse.BooleanOptionalAction, default=True,
                   help="also train from scratch for ar-steps + dlm-steps (default on)")
    p.add_argument("--toy", action="store_true", help="a smoke run (tests): nothing is judged")
    args = p.parse_args(argv)
    torch.set_num_threads(1)   # a shared machine: one thread is steadier than two fighting
    data, work = Path(args.data), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    meta = json.loads((data / "meta.json").read_text())
    vocab = meta["vocab_size"]
    train, val_stream = read_split(data, "train"), read_split(data, "val")
    gv = torch.Generator().manual_seed(1234)
    val = [windows(val_stream, args.seq_len, 8, gv) for _ in range(args.val_batches)]
    load0, t0 = os.getloadavg(), time.time()

    print(f"1. pretraining a Qwen3-MoE-shaped AR model ({args.ar_steps} steps, transformers' loss)", flush=True)
    ar_log = pretrain_ar(train, vocab, work / "ar_hf", args)
    print("2. importing it: python -m evaluation.hf import ... --mask-id", meta["mask_id"], flush=True)
    imported = work / "imported"
    proc = subprocess.run([sys.executable, "-m", "evaluation.hf", "import", str(work / "ar_hf"), str(imported),
                           "--mask-id", str(meta["mask_id"]), "--pad-id", str(meta["pad_id"])],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return 1
    cfg = dlm_config(imported / "config.yaml")
    print("3. converted EC DLM (init.from the import) and 4. the same EC DLM from scratch", flush=True)
    converted = train_dlm("converted", cfg, imported, train, val, args)
    scratch = train_dlm("scratch", cfg, None, train, val, args)
    matched = []
    if args.compute_matched:   # from scratch for as many steps as AR pretraining + conversion took
        print("5. the same EC DLM from scratch for ar-steps + dlm-steps (compute-matched)", flush=True)
        matched = train_dlm("matched", cfg, None, train, val, args, args.ar_steps + args.dlm_steps)
    final = scratch[-1]["val_elbo"]
    reach = steps_to_reach(converted, final)
    ok = reach is not None and reach <= args.dlm_steps // 2
    summary = {"scratch_final_val_elbo": final, "converted_final_val_elbo": converted[-1]["val_elbo"],
               "converted_steps_to_scratch_final": reach, "dlm_steps": args.dlm_steps,
               "target_half_the_steps_met": ok, "ar_pretrain_steps": args.ar_steps,
               "converted_step0_val_elbo": converted[0]["val_elbo"], "scratch_step0_val_elbo": scratch[0]["val_elbo"],
               # the AR pretraining is compute too: its steps (same batch size) plus the diffusion steps
               "converted_total_steps_incl_ar": None if reach is None else args.ar_steps + reach,
               "scratch_val_elbo_at_half": steps_value(scratch, args.dlm_steps // 2),
               "converted_val_elbo_at_half": steps_value(converted, args.dlm_steps // 2),
               "compute_matched_scratch_final_val_elbo": matched[-1]["val_elbo"] if matched else None,
               "compute_matched_scratch_steps": args.ar_steps + args.dlm_steps if matched else None}
    info = machine_info(torch.device("cpu"), torch.float32)
    info.update({"loadavg_start": load0, "loadavg_end": os.getloadavg(), "wall_s": round(time.time() - t0, 1),
                 "in_process": "one process, no DeepSpeed: the trainer's model, loss and evaluate()"})
    doc = {"meta": info, "args": vars(args), "model": {"model": dict(vars(cfg.model)), "moe_router": cfg.moe.router,
                                                       "k": cfg.moe.k, "num_experts": cfg.moe.num_experts},
           "summary": summary, "ar": ar_log, "converted": converted, "scratch": scratch,
           "scratch_compute_matched": matched}
    print(machine_line(info))
    print(f"from scratch: final val ELBO {final:.3f} after {args.dlm_steps} steps; converted reaches it at step "
          f"{reach} ({'target met' if ok else 'target NOT met'}: at most {args.dlm_steps // 2})")
    if matched:
        print(f"compute-matched: from scratch for {args.ar_steps + args.dlm_steps} steps reaches {matched[-1]['val_elbo']:.3f}; "
              f"converted ({args.ar_steps} AR + {args.dlm_steps} diffusion steps) {converted[-1]['val_elbo']:.3f}")
    out = args.out or str(ROOT / "benchmarks" / "results" / f"convert_demo_{time.strftime('%Y-%m-%d')}.json")
    if not args.toy or args.out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=1, default=str))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
