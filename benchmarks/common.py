"""Shared benchmark plumbing: device choice, other processes' CPU load (ForeignLoad for a block,
RunMonitor for a process tree), interleaved timing, tables, JSON.

Benchmarks measure and report; nothing here asserts on time (see DESIGN.md, "Performance method").
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from trainer.launch import free_port  # noqa: F401 (the one free_port, for the benchmarks)


def pick_device() -> tuple[torch.device, torch.dtype]:
    """bf16 on a GPU when one is present, else fp32 on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device` (MemAvailable on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


class ForeignLoad:
    """CPU time other processes used while a block ran, in cores (0 = we had the machine).

    On a shared CPU box a neighbour's job stalls every OpenMP barrier of ours, and a 2-thread
    matmul can slow down tenfold; this is how a benchmark notices. Linux only; 0 elsewhere.
    """

    def __init__(self):
        self.cores = 0.0

    @staticmethod
    def _busy() -> float:
        return busy_cpu_seconds(irq=True)

    def __enter__(self):
        t = os.times()
        self._start = (self._busy(), t.user + t.system, time.perf_counter())
        return self

    def __exit__(self, *exc):
        busy0, own0, wall0 = self._start
        t = os.times()
        wall = max(time.perf_counter() - wall0, 1e-9)
        self.cores = max(self._busy() - busy0 - (t.user + t.system - own0), 0.0) / wall


def busy_cpu_seconds(irq: bool) -> float:
    """CPU seconds the machine spent busy (/proc/stat): user, nice and system time, plus irq and
    softirq time when `irq`. Leave those out where gloo runs: the kernel bills loopback traffic
    there, to no process, so it would read as another process's load. 0 off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(v[0:3]) + (v[5] + v[6] if irq else 0)) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_wait_s: float, threshold_cores: float = 0.1) -> float:
    """Sleep until other processes use under `threshold_cores` for a 2 s window; returns seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        with ForeignLoad() as load:
            time.sleep(2.0)
        if load.cores < threshold_cores:
            break
    return time.perf_counter() - t0


def _proc_stat(pid: int):
    """(ppid, CPU seconds of the process and its reaped children) from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the comm: state ppid ... utime(12) stime(13) cutime(14) cstime(15), 0-based from state
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class RunMonitor(threading.Thread):
    """Samples the machine while a process tree runs (a launched training run, or processes this
    one spawned): busy CPU without irq time (busy_cpu_seconds) minus the CPU of the tree = what
    other processes used. With a metrics.jsonl path it notes when each row appears, so every logged
    window gets its own 'other processes' figure and a window a neighbour disturbed can be told
    apart from a clean one. Linux only; reports 0 elsewhere."""

    def __init__(self, root_pid: int, metrics_path: str = os.devnull, interval: float = 0.2):
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
        self.samples.append((time.perf_counter(), busy_cpu_seconds(irq=False), ours))
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


def time_interleaved(steps: dict[str, Callable[[], None]], warmup: int, repeat: int, device: torch.device,
                     max_foreign_cores: float = 0.25, max_rounds: Optional[int] = None):
    """Seconds per call of every step, from `repeat` rounds, after `warmup` untimed rounds.

    A round runs every step once, in an order rotated by one per round, so slow drift of the
    machine and position effects land on every step alike. On the CPU a round during which other
    processes used more than `max_foreign_cores` is discarded and run again (at most `max_rounds`
    rounds in all, default 3 * repeat; then the contaminated rounds are kept, and flagged).
    Returns (times per step, foreign load of each kept round, number of discarded rounds).
    """
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    max_rounds = max_rounds or 3 * repeat
    kept: list[tuple[dict, float]] = []
    spoiled: list[tuple[dict, float]] = []
    r = 0
    while len(kept) < repeat and r < max_rounds:
        times = {}
        with ForeignLoad() as load:
            for n in names[r % len(names):] + names[:r % len(names)]:
                sync(device)
                t0 = time.perf_counter()
                steps[n]()
                sync(device)
                times[n] = time.perf_counter() - t0
        r += 1
        clean = device.type == "cuda" or load.cores <= max_foreign_cores
        (kept if clean else spoiled).append((times, load.cores))
    if len(kept) < repeat:   # the machine never went quiet: keep the least-loaded spoiled rounds
        spoiled.sort(key=lambda t: t[1])
        missing = repeat - len(kept)
        kept, spoiled = kept + spoiled[:missing], spoiled[missing:]
    discarded = len(spoiled)
    return ({n: [t[n] for t, _ in kept] for n in names}, [c for _, c in kept], discarded)


def profiled_steps(step, max_foreign: float, calls: int = 5):
    """(profiler, calls, foreign cores) of `calls` calls of `step` after 3 untimed ones, from the
    least disturbed of up to 3 tries."""
    for _ in range(3):
        step()
    best = None
    for _ in range(3):
        with ForeignLoad() as load, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                step()
        if best is None or load.cores < best[1]:
            best = (prof, load.cores)
        if load.cores <= max_foreign:
            break
    return best[0], calls, best[1]


def hottest_operators(step, max_foreign: float, row_limit: int) -> tuple[str, float]:
    """The profiler's table of 5 calls of `step`, from the least disturbed of up to 3 tries."""
    prof, _, cores = profiled_steps(step, max_foreign)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit,
                                     max_name_column_width=48), cores


def median_ms(seconds: Sequence[float]) -> float:
    return statistics.median(seconds) * 1e3


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec); a missing key prints '-'."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([format(row[k], f) if row.get(k) is not None else "-" for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ISA extensions that decide CPU matmul speed (oneDNN picks its kernels by them)
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
              "amx_int8", "avx_vnni")


def cpu_info() -> dict:
    """The CPU's model, its matmul-relevant ISA flags and core counts (Linux /proc/cpuinfo)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"cpu_model": model, "isa": [f for f in _ISA_FLAGS if f in flags],
            "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def gpu_info(device: torch.device) -> dict:
    p = torch.cuda.get_device_properties(device)
    return {"gpu": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
            "gpu_mem_gb": round(p.total_memory / 2**30, 1), "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def machine_info(device: torch.device, dtype: torch.dtype) -> dict:
    """Everything a timing depends on: CPU model, ISA flags and cores, the GPU, the torch build."""
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": device.type, "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "python": platform.python_version(), "host": socket.gethostname(),
            **cpu_info()}
    if device.type == "cuda":
        info.update(gpu_info(device))
    # allocator and threading settings change CPU timings a lot (see benchmarks/README.md)
    info["env"] = {k: v for k, v in os.environ.items()
                   if k.startswith(("MALLOC_", "OMP_", "MKL_", "KMP_")) or k in ("THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")}
    return info


def machine_line(info: dict) -> str:
    """One line naming the machine, for the top of every printed table."""
    cpu = (f"{info.get('cpu_model')} ({', '.join(info.get('isa') or []) or 'no AVX2'}), "
           f"{info.get('cpus_usable') or info.get('cpu_count')} cores, {info.get('threads')} threads")
    gpu = f"{info['gpu']} (sm {info['capability']}, CUDA {info['cuda_runtime']}); " if "gpu" in info else ""
    return f"machine: {gpu}{cpu}; torch {info.get('torch')}; {info.get('dtype')}; {info.get('date')}"


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
