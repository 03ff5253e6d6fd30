"""Checkpoint save and load cost: ecdlm's layout-free checkpoint against DeepSpeed's own
`engine.save_checkpoint` (what ecdlm saved through before, plus its expert files), side by side in
one process, on the same engine, after one training step (so Adam's moments exist).

    python benchmarks/checkpoint_io.py [--preset tiny|wide] [--repeat 3] [--json out.json]

Reports the median seconds of each save and load, their ratio, and the peak memory a save adds to
the process (VmHWM over VmRSS, with the high-water mark reset before each save): a save must not
hold a second copy of the rank's share of the model. One process, gloo, ZeRO-2, fp32 on a CPU.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import format_table, free_port, machine_info, machine_line, write_json  # noqa: E402

PRESETS = {   # overrides of configs/tiny.yaml
    "tiny": [],
    "wide": ["model.d_model=512", "model.n_layers=8", "model.n_heads=8", "moe.num_experts=32",
             "moe.expert_hidden=512", "moe.k=2", "train.seq_len=64", "model.max_seq_len=64"],
}


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:   # "5" resets VmHWM to the current RSS (Linux)
        f.write("5")


def measured(fn) -> tuple:
    """(seconds, MiB the call added to the resident peak)."""
    reset_peak()
    rss = vm_kib("VmRSS")
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, (vm_kib("VmHWM") - rss) / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--data", default=os.path.join(ROOT, "data", "default"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())})
    import torch
    from rundir.state import full_model_state
    from rundir.config import load_config
    from trainer.engine.checkpoint import load_checkpoint, save_checkpoint
    from trainer.engine.nonfinite import StepGuard
    from trainer.expert_bias import ExpertBiasBalancer
    from trainer.loop import train_step
    from trainer.session import setup
    from trainer.step_stats import StepStats
    from trainer.distributed import comm_device

    tmp = tempfile.mkdtemp(prefix="ckpt_bench_")
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                      (f"data.path={args.data}", f"train.output_dir={tmp}/run", "wandb.mode=disabled",
                       "train.resume=never", "train.global_batch_size=8", "train.micro_batch_size=8",
                       *PRESETS[args.preset]))
    s = setup(cfg, os.path.join(ROOT, "ds_configs", "zero2.json"))
    train_step(s, 0, StepStats(len(s.model.moe_layers()), cfg.moe.num_experts),   # Adam's state exists after it
               ExpertBiasBalancer(s.model, s.device, comm_device()), StepGuard(s.engine, lambda: []))
    params = sum(p.numel() for p in s.model.parameters())
    ours, theirs = [], []
    for i in range(args.repeat):
        run_dir = os.path.join(tmp, f"ours{i}")
        ours.append(measured(lambda: save_checkpoint(s.engine, s.model, run_dir, 1, s.run_state(1), layout=s.layout,
                                                     keep_last=1, scheduler=s.scheduler)))
        ds_dir = os.path.join(tmp, f"ds{i}")

        def deepspeed_save():   # the pre-layout-free save: DeepSpeed's files plus the stacked experts
            s.engine.save_checkpoint(ds_dir, tag="step_00000001", client_state=s.run_state(1), save_latest=False)
            experts = {k: v for k, v in s.model.state_dict().items() if ".experts." in k}
            torch.save(experts, os.path.join(ds_dir, "step_00000001", "experts.pt"))
        theirs.append(measured(deepspeed_save))
    ckpt = os.path.join(tmp, "ours0", "checkpoints", "step_00000001")
    load_s = statistics.median(measured(lambda: load_checkpoint(s.engine, s.model, ckpt, layout=s.layout,
                                                                scheduler=s.scheduler))[0] for _ in range(args.repeat))
    ds_load_s = statistics.median(measured(lambda: s.engine.load_checkpoint(
        os.path.join(tmp, "ds0"), tag="step_00000001", load_module_strict=False))[0] for _ in range(args.repeat))
    read_s = measured(lambda: full_model_state(ckpt))[0]
    s.loader.close()
    size = lambda d: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)   # noqa: E731
    med = lambda xs, j: statistics.median(x[j] for x in xs)   # noqa: E731
    rows = [{"impl": "ecdlm layout-free", "save_s": med(ours, 0), "load_s": load_s, "peak_mib": med(ours, 1),
             "mib": size(os.path.join(tmp, "ours0")) / 2 ** 20},
            {"impl": "DeepSpeed save_checkpoint", "save_s": med(theirs, 0), "load_s": ds_load_s,
             "peak_mib": med(theirs, 1), "mib": size(os.path.join(tmp, "ds0")) / 2 ** 20}]
    for r in rows:
        r["save_vs_deepspeed"] = r["save_s"] / rows[1]["save_s"]
    info = machine_info(torch.device("cpu"), torch.float32)
    print(f"preset {args.preset}: {params / 1e6:.1f}M parameters, 1 process, ZeRO-2, fp32 | {machine_line(info)}")
    print(format_table(rows, [("impl", "impl", "s"), ("save_s", "save s", ".3f"), ("load_s", "load s", ".3f"),
                              ("save_vs_deepspeed", "x DeepSpeed save", ".2f"), ("peak_mib", "save peak +MiB", ".0f"),
                              ("mib", "size MiB", ".1f")]))
    print(f"full_model_state (evaluation's read, all experts): {read_s:.3f} s")
    if args.json:
        write_json(args.json, {"preset": args.preset, "params": params, "machine": info,
                               "full_model_state_s": read_s}, rows)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
