"""The small-scale retrofit demonstration (issue 12): pretrain a tiny token-choice model, fine-tune it
three ways on a synthetic task with the same steps and expected k, compare decode speed, report.

    python benchmarks/retrofit_demo.py [--out bench_out/retrofit_demo] [--data data/default]
        [--pretrain-steps 300] [--sft-steps 300] [--eval-every 50] [--quick]

1. writes the copy task (benchmarks/retrofit/task.py) and prepares it with `--format sft` and the
   pretraining data's tokenizer;
2. pretrains configs/tiny.yaml as token choice (dropless, the preset's aux-loss balancing);
3. fine-tunes from it, all three at once, each with `init.from` = the TC run and an eval.tasks
   generate entry on the held-out file: `tc_ft` (token choice), `ec_static` (expert choice, k),
   `ec_linear_reverse` (k from 1 to k_max, flop_match=check: E[k] = k or the trainer refuses it).
   With seq_len a multiple of E / k, EC's per-sequence capacity floor(L k / E) loses nothing, so
   every arm computes the same expert FLOPs per token;
4. times the sampler on the three models in this process (benchmarks/retrofit/decode.py);
5. writes OUT/retrofit_demo.json (every number, the machine, the load average at start and end)
   and OUT/report/ (`python -m evaluation.report` on the TC run and the arms).
The default sizes take about 15 minutes on an idle 2-core CPU; --quick is the test-sized run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import format_table, machine_info, machine_line  # noqa: E402
from benchmarks.retrofit import arms, task  # noqa: E402
from benchmarks.retrofit.decode import decode_comparison  # noqa: E402

TASK = "copy"
QUICK = {"pretrain_steps": 30, "sft_steps": 60, "eval_every": 30, "n_train": 400, "n_heldout": 16, "seq_len": 16,
         "decode_prompts": 8, "decode_warmup": 1, "decode_repeat": 3}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Retrofit demonstration: TC pretrain, three fine-tuning arms, decode speed.")
    p.add_argument("--out", default="bench_out/retrofit_demo", help="output directory (runs, JSON, report)")
    p.add_argument("--data", default="data/default", help="prepared pretraining data (its tokenizer is the task's)")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--sft-steps", type=int, default=300, help="fine-tuning steps, the same for every arm")
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out exact-match evaluations")
    p.add_argument("--n-train", type=int, default=2000, help="training examples of the synthetic task")
    p.add_argument("--n-heldout", type=int, default=64, help="held-out examples (exact match, decode prompts)")
    p.add_argument("--seq-len", type=int, default=32, help="SFT sequence length (a multiple of E / k)")
    p.add_argument("--k-max", type=float, default=3.0, help="linear_reverse k_max (k_min 1; E[k] must equal k)")
    p.add_argument("--decode-prompts", type=int, default=32)
    p.add_argument("--decode-warmup", type=int, default=2)
    p.add_argument("--decode-repeat", type=int, default=9)
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed for each training stage")
    p.add_argument("--quick", action="store_true", help="test-sized run (overrides the sizes above)")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for key in ("pretrain_steps", "sft_steps", "eval_every", "n_train", "n_heldout", "decode_prompts", "decode_repeat"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    if not os.path.exists(os.path.join(args.data, "meta.json")):
        p.error(f"--data {args.data}: no meta.json (prepare it first: make data, or python -m trainer.data prepare)")
    return args


def preset_moe() -> dict:
    import yaml
    with open(os.path.join(ROOT, "configs", "tiny.yaml")) as f:
        return yaml.safe_load(f)["moe"]


def check_sizes(args, moe: dict) -> None:
    """Refuse, before any training, a seq_len at which EC's floor(L k / E) would not match TC's k."""
    E, k = moe["num_experts"], moe["k"]
    if (args.seq_len * k) % E:
        raise SystemExit(f"error: --seq-len {args.seq_len}: L*k/E = {args.seq_len}*{k}/{E} is not a whole number, "
                         f"so expert choice would use fewer experts per token than token choice's top-{k}; "
                         f"use a multiple of {E // __import__('math').gcd(E, k)}")


def decode_length(heldout: str, tokenizer_dir: str, seq_len: int) -> int:
    """Tokens to generate: the rest of the training sequence after the longest held-out prompt.
    The fine-tuned model only ever saw sequences of exactly seq_len (prompt, answer, end-of-text
    fill); measured here, a model at train loss 3e-4 copies perfectly on a seq_len canvas and
    gets 0% on a shorter one (it locates digits relative to the sequence's end too)."""
    from evaluation.generation_tasks import load_generation_jsonl
    from rundir.tokenizer import data_tokenizer
    tok = data_tokenizer(tokenizer_dir)
    longest = max(len(tok.encode(it.prompt)) for it in load_generation_jsonl(heldout))
    if longest >= seq_len:
        raise SystemExit(f"error: --seq-len {seq_len} leaves no room to generate after a {longest}-token prompt")
    return seq_len - longest


def gen_task_entry(heldout: str, every: int, n: int, gen_length: int) -> str:
    """The eval.tasks override: greedy generation (one denoising step per token) on the held-out file."""
    return (f"[{{name: {TASK}, path: {heldout}, mode: generate, every: {every}, gen_length: {gen_length}, "
            f"batch_size: {n}}}]")


def series(run_dir: str, key: str) -> list:
    from trainer.metrics import read_rows
    return [[r["step"], r[key]] for r in read_rows(os.path.join(run_dir, "metrics.jsonl")) if r.get(key) is not None]


def moe_ends(run_dir: str) -> dict:
    """First and last logged value of every moe/drop_frac and moe/load_cv layer key."""
    from trainer.metrics import read_rows
    rows = read_rows(os.path.join(run_dir, "metrics.jsonl"))
    keys = sorted({k for r in rows for k in r if k.startswith(("moe/drop_frac/", "moe/load_cv/"))})
    out = {}
    for key in keys:
        vals = [r[key] for r in rows if r.get(key) is not None]
        out[key] = {"first": vals[0], "last": vals[-1]}
    return out


def arm_summary(run_dir: str) -> dict:
    last = lambda s: s[-1][1] if s else None  # noqa: E731
    em = series(run_dir, f"eval/{TASK}/exact_match")
    return {"run_dir": run_dir, "final_train_loss": last(series(run_dir, "train/loss")),
            "final_val_loss": last(series(run_dir, "val/loss")), "exact_match": em,
            "final_exact_match": last(em), "realized_k": last(series(run_dir, "moe/mean_k")), "moe": moe_ends(run_dir)}


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    load_start = os.getloadavg()
    moe = preset_moe()
    check_sizes(args, moe)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(args.data, "meta.json")) as f:
        vocab = json.load(f)["vocab_size"]   # model.vocab_size must equal the tokenizer's

    paths = task.write_task(os.path.join(out, "task"), args.n_train, args.n_heldout, kind=TASK)
    sft_data = task.prepare_task(paths["train"], os.path.join(out, "task", "sft"), args.seq_len,
                                 os.path.join(os.path.abspath(args.data), "tokenizer.model"))
    gen_length = decode_length(paths["heldout"], sft_data, args.seq_len)
    print(f"task: {args.n_train} training / {args.n_heldout} held-out examples in {sft_data}; "
          f"{gen_length} tokens generated per prompt", flush=True)

    common = {"model.vocab_size": vocab, "train.log_every": 10, "train.save_every": 100000, "optim.warmup_steps": 10}
    t0 = time.time()
    pre = {**arms.TC, **common, "data.path": os.path.abspath(args.data), "train.max_steps": args.pretrain_steps,
           "train.eval_every": max(1, args.pretrain_steps // 3), "train.run_name": "tc_pretrain"}
    tc_dir = arms.run_all({"tc_pretrain": pre}, out, args.timeout)["tc_pretrain"]
    pretrain_s = time.time() - t0
    print(f"TC pretrain: {args.pretrain_steps} steps in {pretrain_s:.0f} s", flush=True)

    k = moe["k"]
    specs = {name: {**over, **common, "init.from": tc_dir, "data.path": sft_data, "train.seq_len": args.seq_len,
                    "train.max_steps": args.sft_steps, "train.eval_every": args.eval_every, "train.run_name": name,
                    "eval.tasks": gen_task_entry(paths["heldout"], args.eval_every, args.n_heldout, gen_length)}
             for name, over in arms.arm_specs(k, args.k_max).items()}
    t0 = time.time()
    arm_dirs = arms.run_all(specs, out, args.timeout)
    sft_s = time.time() - t0
    print(f"three fine-tuning arms ({args.sft_steps} steps each, run together) in {sft_s:.0f} s", flush=True)

    from evaluation.loading import load_run
    torch.set_num_threads(1)   # one core per process: the other is the machine's
    models, tok = {}, None
    for name, d in arm_dirs.items():
        models[name], _, tok = load_run(d, tokenizer_dir=sft_data)
    decode = decode_comparison(models, tok, paths["heldout"], args.decode_prompts, gen_length=gen_length, steps=gen_length,
                               warmup=args.decode_warmup, repeat=args.decode_repeat)

    report_dir = os.path.join(out, "report")
    rep = subprocess.run([sys.executable, "-m", "evaluation.report", tc_dir, *arm_dirs.values(), "--out", report_dir,
                          "--name", "tc_pretrain", *[x for n in arm_dirs for x in ("--name", n)]],
                         cwd=ROOT, capture_output=True, text=True)
    print(rep.stdout.strip() or rep.stderr.strip()[-2000:], flush=True)

    summary = {name: arm_summary(d) for name, d in arm_dirs.items()}
    decode_by_arm = {r["arm"]: r for r in decode["rows"]}
    rows = [{"arm": n, **{k2: v for k2, v in s.items() if k2 not in ("exact_match", "moe")},
             **{k2: decode_by_arm[n][k2] for k2 in ("tokens_per_s", "ratio_to_tc", "mean_experts_per_token",
                                                   "load_max_over_mean")}} for n, s in summary.items()]
    result = {"meta": {"args": vars(args), "machine": machine_info(torch.device("cpu"), torch.float32),
                       "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                       "task": {"kind": TASK, "chance_exact_match": task.chance_exact_match(5, 5), **paths},
                       "k": k, "k_max": args.k_max, "gen_length": gen_length, "seconds": {"pretrain": pretrain_s, "fine_tune": sft_s,
                                                                 "total": time.time() - t_start},
                       "report": report_dir if rep.returncode == 0 else f"failed: {rep.stderr[-500:]}"},
              "tc_pretrain": {"run_dir": tc_dir, "final_val_loss": series(tc_dir, "val/loss")[-1][1],
                              "moe": moe_ends(tc_dir)},
              "arms": summary, "decode": decode, "rows": rows}
    with open(os.path.join(out, "retrofit_demo.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(machine_line(result["meta"]["machine"]))
    print(f"load average at start {load_start[0]:.2f}, at end {result['meta']['loadavg_end'][0]:.2f}")
    print(format_table(rows, [("arm", "arm", ""), ("final_train_loss", "train loss", ".3f"),
                              ("final_val_loss", "val loss", ".3f"), ("final_exact_match", "exact match", ".3f"),
                              ("tokens_per_s", "decode tok/s", ".0f"), ("ratio_to_tc", "vs TC", ".2f"),
                              ("mean_experts_per_token", "experts/token", ".2f"),
                              ("load_max_over_mean", "load max/mean", ".2f")]))
    print(f"wrote {os.path.join(out, 'retrofit_demo.json')}")
    return 0 if rep.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
