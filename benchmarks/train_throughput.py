"""End-to-end training throughput of EC vs TC vs dense, through the real trainer on 2 processes.

    python benchmarks/train_throughput.py [--preset ffn|fine|tiny] [--ep 2] [--steps 30] [--warmup 10]
        [--window 5] [--impls ec ec_dynamic tc_cf1 tc_dropless dense] [--rounds 1] [--json out.json]
    python benchmarks/train_throughput.py --profile [--preset ffn]     # one process, no launcher

Each implementation is one `deepspeed --num_gpus N trainer/main.py` run (gloo on the CPU, ZeRO-2,
fp32, moe.ep_size = N by default: each rank holds 1/N of the experts) of the same preset, data
and diffusion noise, for `warmup + steps` optimizer steps:

    ec           expert choice, static capacity schedule at k = moe.k (C = L k / E per sequence):
                 the same expected k as TC, so the FLOPs match exactly
    ec_dynamic   expert choice with the preset's timestep-aware schedule (E[k] = moe.k by FLOP
                 matching; per-sequence capacities, one host sync per layer)
    tc_cf1       token choice top-k, capacity factor 1.0 (padded slots computed)
    tc_dropless  token choice top-k, no capacity (grouped matmul / per-expert loop on ragged rows)
    dense        every MoE layer replaced by one SwiGLU of width (k + num_shared) * h_e: the same
                 active FFN parameters per token (only the router's E * D weights differ)

The trainer logs `perf/step_s` (mean step time over a window of `--window` steps, averaged over
ranks) and `perf/rank_spread_s` (max - min over ranks of that mean). The first `--warmup` steps
(whole windows) are discarded; the headline step time is the median over the remaining windows
(of all rounds), tokens/s = global tokens per step / that, and rank spread the median window
spread. Step time excludes evaluation and checkpointing (the trainer times the optimizer step
only). Each rank runs with OMP_NUM_THREADS=--threads (default: cores / processes, so the ranks
do not oversubscribe the CPU). Other processes' CPU use during each run is measured and printed;
results from a busy machine are flagged, not hidden.

`--profile` answers "where does the time go" for the same shapes in one process: a full
training step (forward, backward, AdamW) per implementation, the FFN sublayers alone (the MoE
layer or the dense SwiGLU, forward + backward on the captured inputs) and the MoE layer's
hottest operators.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):   # run as a script: make the repository root importable
    sys.path.insert(0, str(ROOT))

from benchmarks.common import ForeignLoad, format_table, free_port, wait_for_idle, write_json  # noqa: E402

IMPLS = ("ec", "ec_dynamic", "tc_cf1", "tc_dropless", "dense")
DEFAULT_IMPLS = ("ec", "tc_cf1", "tc_dropless", "dense", "ec_dynamic")

# Overrides on top of configs/tiny.yaml. `tiny` is the preset itself. `ffn` widens the model so
# the FFN (the part EC, TC and dense differ in) is a real share of the step. `fine` has the
# reference setup's fine-grained experts (owt_ec.yaml: 512 experts of width 0.75 d, k=20, 2
# shared, routed width 15 d) scaled to a CPU: 64 experts of width 0.5 d, k=8, 2 shared, so the
# routed FFN (4 d wide) is most of the step; see README.
PRESETS = {
    "tiny": [],
    "ffn": ["model.d_model=256", "moe.expert_hidden=256",
            "train.global_batch_size=32", "train.micro_batch_size=16", "train.seq_len=128"],
    "fine": ["model.d_model=256", "moe.num_experts=64", "moe.expert_hidden=128", "moe.k=8",
             "moe.num_shared_experts=2", "moe.capacity.k_min=4", "moe.capacity.k_max=12",
             "train.global_batch_size=32", "train.micro_batch_size=16", "train.seq_len=128"],
}


CODE_DIRS = ("model", "trainer", "configs", "ds_configs")   # all that `trainer/main.py` runs


def model_sha(root: Path = ROOT) -> str:
    import hashlib
    h = hashlib.sha256()
    for f in sorted((root / "model").rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()[:12]


def code_state() -> dict:
    """The commit, the tracked files changed since it, and a hash of model/ as it is on disk: other
    people edit the model while benchmarks run, and a table must say which code it measured."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": git("diff", "--name-only", "HEAD").split(),
            "model_sha": model_sha()}


def snapshot_code(dest: str) -> str:
    """Copy the trainer and model sources to `dest`, so that every run of one benchmark executes
    the same code even while someone edits the working tree. Returns the snapshot's model/ sha."""
    for d in CODE_DIRS:
        shutil.copytree(ROOT / d, os.path.join(dest, d), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return model_sha(Path(dest))


def in_code(args, path: str) -> str:
    """A repository-relative path as seen from the code the runs execute."""
    return path if os.path.isabs(path) else os.path.join(args.code_dir, path)


def allocator_env() -> dict:
    """Environment that changes CPU speed a lot (glibc's malloc thresholds, preloaded allocators)."""
    return {k: v for k, v in os.environ.items()
            if k.startswith(("MALLOC_", "LD_PRELOAD", "THP_", "OMP_", "MKL_", "KMP_"))}


def impl_overrides(impl: str, cfg) -> list:
    """The dotted overrides that turn the preset into implementation `impl`."""
    e = cfg.moe
    if impl == "ec":
        return ["moe.router=expert_choice", "moe.capacity.schedule=static"]
    if impl == "ec_dynamic":
        return ["moe.router=expert_choice"]
    if impl == "tc_cf1":
        return ["moe.router=token_choice", "moe.capacity_factor=1.0"]
    if impl == "tc_dropless":
        return ["moe.router=token_choice", "moe.capacity_factor=null"]
    if impl == "dense":   # shared experts are one SwiGLU too: fold them into the dense width
        shared = e.num_shared_experts * (e.shared_expert_hidden or e.expert_hidden)
        return ["moe.router=dense", f"moe.dense_hidden={e.k * e.expert_hidden + shared}"]
    raise ValueError(impl)


def common_overrides(args, run_dir: str) -> list:
    total = args.warmup + args.steps
    return [*PRESETS[args.preset], f"moe.ep_size={args.ep}", f"data.path={ROOT / args.data}",
            f"train.output_dir={run_dir}",
            f"train.max_steps={total}", f"train.log_every={args.window}", f"train.eval_every={total}",
            f"train.save_every={total}", "train.resume=never", "wandb.mode=disabled", "eval.batches=1",
            *args.override]


def load_run_config(args, impl: str, run_dir: str = "unused"):
    from trainer.config import load_config
    base = common_overrides(args, run_dir)
    path = in_code(args, args.config)
    cfg = load_config(path, tuple(base))
    return load_config(path, tuple(base + impl_overrides(impl, cfg)))


def describe(args, impls) -> list[dict]:
    """Per implementation: parameter counts from the config (active must match across impls)."""
    out = []
    for impl in impls:
        cfg = load_run_config(args, impl)
        c = cfg.model_config.param_counts()
        e = cfg.moe
        ffn = (e.dense_hidden if e.router == "dense" else
               f"{e.num_experts}x{e.expert_hidden} k={e.k} + {e.num_shared_experts} shared")
        out.append({"impl": impl, "total_M": c["total"] / 1e6, "active_M": c["active"] / 1e6,
                    "total": c["total"], "active": c["active"], "ffn": str(ffn)})
    return out


# ---- the multi-process runs ------------------------------------------------------------------------
def launch(args, impl: str, run_dir: str) -> tuple[float, float, dict]:
    """One training run; returns (wall seconds, other processes' mean CPU use in cores, and that
    use per logged window, keyed by step)."""
    cfg = load_run_config(args, impl, run_dir)
    overrides = common_overrides(args, run_dir) + impl_overrides(impl, cfg)
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.nproc),
           "--master_port", str(free_port()), "trainer/main.py", "--ds_config", in_code(args, args.ds_config),
           "--config", in_code(args, args.config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "launcher.log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        # its own session, so that an interrupted benchmark can stop the launcher and both ranks
        proc = subprocess.Popen(cmd, cwd=args.code_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        monitor = RunMonitor(proc.pid, os.path.join(run_dir, "metrics.jsonl"))
        monitor.start()
        try:
            rc = proc.wait()
        finally:
            monitor.stop()
            if proc.poll() is None:
                stop_group(proc)
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = Path(log_path).read_text()[-4000:]
        raise RuntimeError(f"{impl}: trainer exited with {rc}; log {log_path}:\n{tail}")
    return wall, monitor.run_foreign_cores(), monitor.window_foreign_cores()


def stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def _proc_stat(pid: int):
    """(ppid, CPU seconds of the process and its reaped children) from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the comm: state ppid ... utime(12) stime(13) cutime(14) cstime(15), 0-based from state
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU seconds the machine spent in user, nice and system time. Unlike ForeignLoad, irq and
    softirq time are left out: the kernel bills loopback traffic (gloo's) there, to no process."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:4]]
    except OSError:
        return 0.0
    return sum(v) / os.sysconf("SC_CLK_TCK")


class RunMonitor(threading.Thread):
    """Samples the machine while a run goes: total busy CPU (/proc/stat) minus the CPU of our own
    process tree = what other processes used. Notes when each metrics row appears, so every logged
    window gets its own 'other processes' figure and a window a neighbour disturbed can be told
    apart from a clean one. Linux only; reports 0 elsewhere."""

    def __init__(self, root_pid: int, metrics_path: str, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.path, self.interval = root_pid, metrics_path, interval
        self.samples: list[tuple[float, float, float]] = []   # (time, busy cpu s, our cpu s)
        self.rows: list[tuple[int, bool, int]] = []            # (step, is a train window, sample index)
        self.pids: set = {root_pid}
        self._halt = threading.Event()
        self._offset = 0

    def _descendants(self) -> set:
        children: dict = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = _proc_stat(int(name))
                if st is not None:
                    children.setdefault(st[0], []).append(int(name))
        out, todo = set(), [self.root]
        while todo:
            pid = todo.pop()
            out.add(pid)
            todo += children.get(pid, [])
        return out

    def _sample(self, rescan: bool) -> None:
        if rescan:
            self.pids |= self._descendants()
        # live processes of the tree (with the children they reaped), plus this process and the
        # children it reaped: a process's CPU moves into its parent's count when it is reaped
        ours = sum(st[1] for st in map(_proc_stat, self.pids) if st is not None)
        t = os.times()
        ours += t.user + t.system + t.children_user + t.children_system
        self.samples.append((time.perf_counter(), _busy_seconds(), ours))
        try:
            with open(self.path) as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        lines = chunk.split("\n")
        self._offset += len(chunk) - len(lines[-1])   # a partial last line is read again next time
        for line in lines[:-1]:
            if line.strip():
                row = json.loads(line)
                self.rows.append((row["step"], row.get("perf/step_s") is not None, len(self.samples) - 1))

    def run(self) -> None:
        n = 0
        while not self._halt.is_set():
            self._sample(rescan=n % 10 == 0 or n < 25)   # often while the launcher spawns ranks
            n += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self._sample(rescan=False)

    def _foreign(self, i: int, j: int) -> float:
        (t0, b0, o0), (t1, b1, o1) = self.samples[i], self.samples[j]
        return max((b1 - b0) - (o1 - o0), 0.0) / max(t1 - t0, 1e-9)

    def window_foreign_cores(self) -> dict:
        """Step of each train window -> other processes' cores from the previous row to this one."""
        out = {}
        for (_, _, i), (step, train, j) in zip(self.rows, self.rows[1:]):
            if train and j > i:
                out[step] = self._foreign(i, j)
        return out

    def foreign_between(self, t0: float, t1: float) -> float:
        """Other processes' cores between two perf_counter times (the nearest samples)."""
        times = [x[0] for x in self.samples]
        i = max(min(range(len(times)), key=lambda k: abs(times[k] - t0)), 0)
        j = min(range(len(times)), key=lambda k: abs(times[k] - t1))
        return self._foreign(i, j) if j > i else 0.0

    def run_foreign_cores(self) -> float:
        return self._foreign(0, len(self.samples) - 1) if len(self.samples) > 1 else 0.0


def wait_until_idle(max_wait_s: float) -> float:
    """wait_for_idle, then a random pause and a second look: two benchmarks that both wait for an
    idle machine would otherwise see it in the same instant and start together, spoiling both."""
    import random
    t0 = time.perf_counter()
    waited = wait_for_idle(max_wait_s)
    if waited < max_wait_s:
        time.sleep(random.uniform(0.0, 4.0))
        wait_for_idle(max(max_wait_s - (time.perf_counter() - t0), 0.0))
    return time.perf_counter() - t0


def read_windows(run_dir: str, warmup: int, foreign: dict) -> list[dict]:
    """The logged training windows that end after the warm-up steps, each with the CPU that other
    processes used during it (`foreign_cores`)."""
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("perf/step_s") is not None and r["step"] > warmup:
                rows.append({**r, "foreign_cores": foreign.get(r["step"], 0.0)})
    return rows


def clean(windows: list[dict], max_foreign: float) -> list[dict]:
    return [w for w in windows if w["foreign_cores"] <= max_foreign]


def summarize(impl: str, windows: list[dict], runs: list[dict], tokens_per_step: int, args, meta: dict) -> dict:
    """Medians over the clean windows (other processes under --max-foreign cores), or over all
    windows when fewer than --min-clean are clean (then flagged `noisy`)."""
    good = clean(windows, args.max_foreign)
    noisy = len(good) < args.min_clean
    use = windows if noisy else good
    step = [w["perf/step_s"] for w in use]
    spread = [w["perf/rank_spread_s"] for w in use]
    step_s = statistics.median(step)
    drops = [[v for k, v in w.items() if k.startswith("moe/drop_frac/")] for w in use]
    return {"impl": impl, "tokens_per_s": tokens_per_step / step_s, "step_s": step_s,
            "rank_spread": statistics.median(spread), "rank_spread_max": max(spread),
            "step_s_mean": statistics.fmean(step), "step_s_min": min(step), "step_s_max": max(step),
            "windows": len(use), "windows_total": len(windows), "noisy": noisy,
            "window_step_s": [w["perf/step_s"] for w in windows],
            "window_foreign_cores": [round(w["foreign_cores"], 3) for w in windows],
            "foreign_cores": max(w["foreign_cores"] for w in use),
            "tflops_per_device": statistics.median(w["perf/tflops_per_device"] for w in use),
            "mean_k": statistics.fmean(w["moe/mean_k"] for w in use),
            "drop_frac": statistics.fmean(statistics.fmean(d) if d else 0.0 for d in drops),
            "final_loss": windows[-1]["train/loss"], "runs": len(runs),
            "wall_s": sum(r["wall_s"] for r in runs), "waited_s": sum(r["waited_s"] for r in runs),
            **meta}


def run_all(args, impls) -> list[dict]:
    """`--rounds` rounds over all implementations (order rotated each round), then extra rounds,
    up to `--max-rounds`, for implementations with fewer than `--min-clean` clean windows."""
    windows = {i: [] for i in impls}
    runs = {i: [] for i in impls}
    for r in range(max(args.max_rounds, args.rounds)):
        todo = impls if r < args.rounds else [
            i for i in impls if len(clean(windows[i], args.max_foreign)) < args.min_clean]
        if not todo:
            break
        order = todo[r % len(todo):] + todo[:r % len(todo)]   # rotate: drift hits all alike
        for impl in order:
            run_dir = os.path.join(args.base, f"{impl}_r{r}")
            shutil.rmtree(run_dir, ignore_errors=True)
            waited = wait_until_idle(args.wait_idle) if args.wait_idle > 0 else 0.0
            wall, foreign, per_window = launch(args, impl, run_dir)
            w = read_windows(run_dir, args.warmup, per_window)
            windows[impl] += w
            runs[impl].append({"wall_s": wall, "foreign_cores": foreign, "waited_s": waited})
            ms = " ".join(f"{x['perf/step_s'] * 1e3:.0f}" + ("*" if x["foreign_cores"] > args.max_foreign else "")
                          for x in w)
            print(f"  round {r} {impl:<12} windows ms/step: {ms}  (wall {wall:5.1f} s, "
                  f"other processes {foreign:.2f} cores, waited {waited:.0f} s for idle)", flush=True)
    cfg = load_run_config(args, impls[0])
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    counts = {d["impl"]: d for d in describe(args, impls)}
    rows = [summarize(i, windows[i], runs[i], tokens_per_step, args,
                      {"active_params": counts[i]["active"], "total_params": counts[i]["total"]})
            for i in impls]
    ref = {r["impl"]: r for r in rows}
    for r in rows:
        r["speedup_vs_tc_dropless"] = (r["tokens_per_s"] / ref["tc_dropless"]["tokens_per_s"]
                                       if "tc_dropless" in ref else None)
        r["step_vs_dense"] = r["step_s"] / ref["dense"]["step_s"] if "dense" in ref else None
    return rows


# ---- single-process profile ------------------------------------------------------------------------
def profile(args, impls) -> list[dict]:
    """One process, the per-rank shapes (micro_batch x seq_len), no DeepSpeed and no gloo."""
    args = argparse.Namespace(**{**vars(args), "ep": 1})   # every expert in this one process
    import torch
    from benchmarks.common import median_ms, time_interleaved
    from model import DiffusionTransformer
    from trainer.engine.build import build_optimizer
    from trainer.noise import global_batch_noise
    from trainer.engine.objective import DiffusionObjective

    torch.set_num_threads(args.threads)
    steps, moe_layers, ffn_layers, params = {}, {}, {}, {}
    for impl in impls:
        cfg = load_run_config(args, impl)
        t = cfg.train
        model = DiffusionTransformer(cfg.model_config, seed=t.seed)
        obj = DiffusionObjective(model)
        opt = build_optimizer(list(obj.parameters()), cfg, ds={})   # the trainer's (fused) AdamW
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(4, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len), generator=gen)
        u_G, tok_u = global_batch_noise(t.seed, 0, t.micro_batch_size, t.seq_len, True)
        captured = []   # (ffn module, its input, mask ratio) for every block, from one forward
        hooks = [b.ffn.register_forward_pre_hook(
            lambda m, a, captured=captured: captured.append((m, a[0].detach(), *a[1:])))
            for b in model.blocks]
        obj(tokens, u_G, tok_u)
        for h in hooks:
            h.remove()

        def fwd_bwd(obj=obj, tokens=tokens, u=u_G, tu=tok_u):
            for p in obj.parameters():
                p.grad = None
            loss, _, _ = obj(tokens, u, tu)
            loss.backward()

        def ffn_step(captured=captured):
            for m, x, *rest in captured:
                x = x.requires_grad_()
                out = m(x, *rest) if rest else m(x)
                (out.hidden.sum() + out.loss if hasattr(out, "hidden") else out.sum()).backward()
        fwd_bwd()   # gradients for the optimizer step to use
        steps[f"{impl}/fwd_bwd"], steps[f"{impl}/ffn"], steps[f"{impl}/opt"] = fwd_bwd, ffn_step, opt.step
        moe_layers[impl] = captured[0] if hasattr(captured[0][0], "route") else None
        ffn_layers[impl] = captured
        params[impl] = sum(p.numel() for p in obj.parameters())
    times, loads, _ = time_interleaved(steps, warmup=args.profile_warmup, repeat=args.profile_repeat,
                                       device=torch.device("cpu"), max_foreign_cores=args.max_foreign)
    rows = []
    for impl in impls:
        fb, ffn, opt = (median_ms(times[f"{impl}/{k}"]) for k in ("fwd_bwd", "ffn", "opt"))
        rows.append({"impl": impl, "fwd_bwd_ms": fb, "ffn_ms": ffn, "other_ms": fb - ffn, "ffn_share": ffn / fb,
                     "opt_ms": opt, "params_M": params[impl] / 1e6})
    print(f"one process, {args.threads} thread(s), micro-batch {cfg.train.micro_batch_size} x {cfg.train.seq_len}: "
          f"median of {args.profile_repeat} (other processes: max {max(loads):.2f} cores in a kept round)")
    print(format_table(rows, [("impl", "impl", "s"), ("fwd_bwd_ms", "fwd+bwd ms", ".1f"),
                              ("ffn_ms", "of which FFN ms", ".1f"), ("other_ms", "rest ms", ".1f"),
                              ("ffn_share", "FFN share", ".0%"), ("opt_ms", "AdamW ms", ".1f"),
                              ("params_M", "params M", ".2f")]))
    print("FFN = the MoE layers (router, routing, dispatch, experts, combine, shared expert) or the dense "
          "SwiGLUs, fwd+bwd on the captured inputs; AdamW over all parameters (ZeRO-2 steps half per rank, "
          "and reduces every gradient across ranks: total, not active, parameters)")
    for impl, cap in moe_layers.items():
        if cap is None:
            continue
        for _ in range(3):
            steps[f"{impl}/ffn"]()
        best = None
        for _ in range(3):   # the least disturbed of up to 3 tries
            with ForeignLoad() as load, torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    steps[f"{impl}/ffn"]()
            if best is None or load.cores < best[1]:
                best = (prof, load.cores)
            if load.cores <= args.max_foreign:
                break
        prof, cores = best
        print(f"\n{impl}: hottest operators of the MoE layers' fwd+bwd (all {len(ffn_layers[impl])} layers, "
              f"5 iterations, self CPU time; other processes used {cores:.2f} cores meanwhile)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_ops,
                                        max_name_column_width=48))
    return rows


def profile_engine(args, impls) -> list[dict]:
    """The real trainer set-up (DeepSpeed engine, ZeRO, the trainer's optimizer and loader, gloo)
    in `--nproc` processes started here, one micro-batch of the per-rank shape per step, with
    forward, backward and engine.step timed apart; then rank 0's hottest operators."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    monitor = RunMonitor(os.getpid(), os.devnull)   # other processes' CPU, per timed segment below
    monitor.start()
    try:
        mp.start_processes(_engine_rank, args=(args.nproc, free_port(), args, impls, queue), nprocs=args.nproc,
                           start_method="spawn")
    finally:
        monitor.stop()
    got = [queue.get() for _ in range(args.nproc)]
    by_rank = {r: (rows, tables) for r, rows, tables in got}
    rows, tables = by_rank[0]
    for i, row in enumerate(rows):
        totals = [by_rank[r][0][i]["total_ms"] for r in by_rank]
        row["rank_spread_ms"] = max(totals) - min(totals)
        row["foreign_cores"] = monitor.foreign_between(*row.pop("span"))
        for r in by_rank:
            by_rank[r][0][i].pop("span", None)
    print(f"\nthe trainer's engine in {args.nproc} process(es) started here ({args.ds_config}, gloo, "
          f"{args.threads} thread(s) each), micro-batch {rows[0]['micro_batch']} x {rows[0]['seq_len']} per rank "
          f"per step: rank 0's median of {args.profile_repeat} steps")
    print(format_table(rows, [("impl", "impl", "s"), ("forward_ms", "forward ms", ".1f"),
                              ("backward_ms", "backward ms", ".1f"), ("engine.step_ms", "engine.step ms", ".1f"),
                              ("total_ms", "total ms", ".1f"), ("rank_spread_ms", "rank spread ms", ".1f"),
                              ("params_M", "params M", ".2f"), ("foreign_cores", "other cores", ".2f")]))
    print("backward includes ZeRO's gradient hooks (bucketing, reduce-scatter); engine.step the gradient norm, "
          "clipping, AdamW on this rank's partition and the all-gather of updated parameters")
    for impl, table in tables.items():
        print(f"\n{impl}, rank 0: hottest operators of 3 whole steps (forward, backward, engine.step), self CPU time")
        print(table)
    return rows


def _engine_rank(rank: int, world: int, port: int, args, impls, queue) -> None:
    import logging

    import torch
    import torch.distributed as dist
    from trainer import loop, session
    from trainer.noise import global_batch_noise

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    rows, tables = [], {}
    base = tempfile.mkdtemp(prefix="train_throughput_profile_") if rank == 0 else None
    base = [base]
    dist.broadcast_object_list(base, src=0)
    base = base[0]
    try:
        for impl in impls:
            cfg = load_run_config(args, impl, os.path.join(base, impl))
            t = cfg.train
            per_rank = t.global_batch_size // world
            t.global_batch_size, t.micro_batch_size = per_rank * world, per_rank   # no accumulation
            s = session.setup(cfg, args.ds_config)
            logging.getLogger("ecdlm").setLevel(logging.WARNING)
            times = {"forward": [], "backward": [], "engine.step": []}

            def step(i, record):
                u, tu = global_batch_noise(t.seed, i, t.global_batch_size, t.seq_len, True)
                mb = s.loader.next_micro_batch()
                idx = mb.global_offsets
                t0 = time.perf_counter()
                loss = s.engine(mb.tokens, u[idx], tu[idx]).loss
                t1 = time.perf_counter()
                s.engine.backward(loss)
                t2 = time.perf_counter()
                s.engine.step()
                t3 = time.perf_counter()
                if record:
                    for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                        times[k].append(dt)

            for i in range(args.profile_warmup + 2):
                step(i, False)
            dist.barrier()
            start = time.perf_counter()
            for i in range(args.profile_repeat):
                step(100 + i, True)
            span = (start, time.perf_counter())
            if rank == 0:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                            record_shapes=args.profile_shapes) as prof:
                    for i in range(3):
                        step(200 + i, False)
                tables[impl] = prof.key_averages(group_by_input_shape=args.profile_shapes).table(
                    sort_by="self_cpu_time_total", row_limit=args.profile_ops, max_name_column_width=48,
                    max_shapes_column_width=80)
            else:
                for i in range(3):
                    step(200 + i, False)
            s.loader.close()
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rows.append({"impl": impl, **{f"{k}_ms": v for k, v in med.items()}, "total_ms": sum(med.values()),
                         "span": span, "micro_batch": per_rank, "seq_len": t.seq_len,
                         "params_M": sum(p.numel() for p in s.model.parameters()) / 1e6})
            del s
            dist.barrier()
    finally:
        if rank == 0:
            shutil.rmtree(base, ignore_errors=True)
    queue.put((rank, rows, tables))
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="ffn",
                   help="overrides on top of --config (default ffn: tiny with d_model and h_e doubled)")
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--ds-config", dest="ds_config", default="ds_configs/zero2.json")
    p.add_argument("--data", default="data/default")
    p.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS), choices=IMPLS)
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="optimizer steps discarded (whole windows)")
    p.add_argument("--window", type=int, default=5, help="steps per logged window (train.log_every)")
    p.add_argument("--rounds", type=int, default=1, help="runs per implementation, interleaved")
    p.add_argument("--max-rounds", type=int, default=3,
                   help="rerun implementations with fewer than --min-clean clean windows, up to this many rounds")
    p.add_argument("--min-clean", type=int, default=3, help="clean windows wanted per implementation")
    p.add_argument("--max-foreign", type=float, default=0.25, metavar="CORES",
                   help="a window during which other processes used more CPU than this is not clean")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--ep", type=int, help="moe.ep_size (default --nproc: every rank holds 1/nproc of the "
                                          "experts, the expert-parallel layout; 1 replicates them)")
    p.add_argument("--threads", type=int, default=max((os.cpu_count() or 2) // 2, 1),
                   help="OMP threads per rank (default: cores / 2)")
    p.add_argument("--override", nargs="*", default=[], help="extra dotted key=value for every run")
    p.add_argument("--keep", metavar="DIR", help="keep run directories under DIR (default: a temp dir)")
    p.add_argument("--wait-idle", type=float, default=60.0, metavar="S",
                   help="before each run, wait up to S seconds for other processes to leave the CPU (0: don't)")
    p.add_argument("--json", help="write rows {impl, tokens_per_s, step_s, rank_spread, ...} here")
    p.add_argument("--profile", nargs="?", const="all", choices=("all", "modules", "engine"),
                   help="single-process breakdown instead of the runs: the model's modules (no DeepSpeed), "
                        "the trainer's engine, or both (default)")
    p.add_argument("--profile-warmup", type=int, default=3)
    p.add_argument("--profile-repeat", type=int, default=10)
    p.add_argument("--profile-ops", type=int, default=15)
    p.add_argument("--profile-shapes", action="store_true", help="engine profile: one row per operator and input shapes")
    args = p.parse_args(argv)
    if args.warmup % args.window or args.steps % args.window or args.steps < args.window:
        p.error("--warmup and --steps must be multiples of --window (and --steps >= --window)")
    impls = list(dict.fromkeys(args.impls))
    args.ep = args.ep or args.nproc
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the clean-up (finally) on SIGTERM too
    # cores our ranks leave free may be used by others without disturbing the measurement
    args.max_foreign += max((os.cpu_count() or 1) - args.nproc * args.threads, 0)

    import torch
    code = code_state()
    args.code_dir = str(ROOT)
    if not args.profile:   # the runs execute a snapshot of the code, taken now
        args.base = args.keep or tempfile.mkdtemp(prefix="train_throughput_")
        args.code_dir = os.path.join(args.base, "code")
        shutil.rmtree(args.code_dir, ignore_errors=True)
        code["model_sha"] = snapshot_code(args.code_dir)
    try:
        run_main(args, impls, code)
    finally:
        if not args.profile and not args.keep:
            shutil.rmtree(args.base, ignore_errors=True)


def run_main(args, impls, code) -> None:
    import torch
    cfg = load_run_config(args, impls[0])
    m, e, t = cfg.model, cfg.moe, cfg.train
    print(f"preset {args.preset} ({args.config} + {' '.join(PRESETS[args.preset]) or 'no overrides'}): "
          f"d_model {m.d_model}, {m.n_layers} layers, E {e.num_experts} x h_e {e.expert_hidden}, k {e.k}, "
          f"{e.num_shared_experts} shared; {t.global_batch_size} x {t.seq_len} tokens per step, "
          f"micro-batch {t.micro_batch_size}; torch {torch.__version__}, fp32")
    print(f"code: commit {code['commit']}, model/ sha {code['model_sha']}"
          + (f", uncommitted changes in {' '.join(code['dirty'])}" if code["dirty"] else ""))
    env = allocator_env()
    print("environment: " + (" ".join(f"{k}={v}" for k, v in env.items()) or "default allocator, no thread settings"))
    sched = load_run_config(args, "ec_dynamic").moe.capacity
    print(f"ec uses the static capacity schedule at k = moe.k = {e.k} (the same k and FLOPs as TC); ec_dynamic "
          f"the preset's {sched.schedule} schedule (k {sched.k_min:g}..{sched.k_max:g}, E[k] = {sched.k_target:g}); "
          "dense = one SwiGLU of the same active width")
    params = describe(args, impls)
    print(format_table(params, [("impl", "impl", "s"), ("total_M", "total params M", ".3f"),
                                ("active_M", "active params M", ".3f"), ("ffn", "FFN", "s")]))
    act = {d["impl"]: d["active"] for d in params}
    if "dense" in act:
        diffs = {i: a - act["dense"] for i, a in act.items() if i != "dense"}
        print(f"active params minus dense: {diffs} (the routers' E x D weights: "
              f"{cfg.model.n_layers * e.num_experts * m.d_model})")
    if args.profile:
        torch.set_num_threads(args.threads)
        rows = profile(args, impls) if args.profile in ("all", "modules") else []
        rows += profile_engine(args, impls) if args.profile in ("all", "engine") else []
        if args.json:
            write_json(args.json, {"mode": "profile", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": code,
                                   "env": allocator_env(),
                                   "preset": args.preset, "overrides": PRESETS[args.preset] + args.override,
                                   "threads": args.threads}, rows)
        return

    print(f"{args.nproc} processes x {args.threads} thread(s), moe.ep_size={args.ep}, {args.ds_config}, gloo; "
          f"{args.warmup} warm-up + "
          f"{args.steps} timed steps per run, windows of {args.window}, {args.rounds} round(s)", flush=True)
    rows = run_all(args, impls)
    print(format_table(rows, [("impl", "impl", "s"), ("tokens_per_s", "tokens/s", ",.0f"),
                              ("step_s", "step s", ".4f"), ("rank_spread", "rank spread s", ".4f"),
                              ("step_vs_dense", "/dense", ".2f"),
                              ("speedup_vs_tc_dropless", "x tc_dropless", ".2f"),
                              ("mean_k", "mean k", ".2f"), ("drop_frac", "drop", ".3f"),
                              ("tflops_per_device", "TFLOP/s/dev", ".4f"), ("windows", "windows", "d"),
                              ("foreign_cores", "other cores", ".2f")]))
    ref = {r["impl"]: r for r in rows}
    if model_sha() != code["model_sha"]:
        print(f"note: model/ in the working tree changed during the benchmark; every run executed the snapshot "
              f"taken at the start (model/ sha {code['model_sha']})")
    def verdict(ok: bool, *impls) -> str:
        if any(ref[i]["noisy"] for i in impls):
            return f"INCONCLUSIVE ({' and '.join(i for i in impls if ref[i]['noisy'])} measured on a busy machine)"
        return "met" if ok else "MISSED"
    targets = {}
    if {"ec", "tc_dropless"} <= ref.keys():
        x = ref["ec"]["speedup_vs_tc_dropless"]
        targets["ec_vs_tc_dropless_tokens_per_s"] = x
        print(f"target EC >= 1.2x TC dropless tokens/s: {x:.2f}x -> {verdict(x >= 1.2, 'ec', 'tc_dropless')}")
    if {"ec", "dense"} <= ref.keys():
        x = ref["ec"]["step_vs_dense"]
        targets["ec_vs_dense_step_s"] = x
        print(f"target EC step time <= 1.15x dense: {x:.2f}x -> {verdict(x <= 1.15, 'ec', 'dense')}")
    print(f"medians over windows of {args.window} steps during which other processes used <= {args.max_foreign} "
          f"cores ('*' above marks the others); 'other cores' is the most they used in a counted window")
    noisy = [r["impl"] for r in rows if r["noisy"]]
    if noisy:
        print(f"NOISY: {', '.join(noisy)} had fewer than {args.min_clean} clean windows, so all their windows "
              "count; rerun with --wait-idle / --max-rounds for cleaner numbers")
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": code, "torch": torch.__version__, "dtype": "float32",
                "backend": "gloo", "cpu_count": os.cpu_count(), "nproc": args.nproc, "ep_size": args.ep,
                "threads": args.threads,
                "preset": args.preset, "overrides": PRESETS[args.preset] + args.override,
                "steps": args.steps, "warmup": args.warmup, "window": args.window, "rounds": args.rounds,
                "tokens_per_step": t.global_batch_size * t.seq_len,
                "ec_schedule": f"static (k = moe.k = {e.k})", "ec_dynamic_schedule": sched.schedule,
                "per_run_idle_wait_max_s": args.wait_idle, "max_foreign_cores": args.max_foreign,
                "targets": targets, "env": allocator_env()}
        write_json(args.json, meta, rows)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
