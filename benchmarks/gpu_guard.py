"""What keeps benchmarks/gpu.sh's run from being lost: a lent GPU is rare and its time is short.

    with limited(60) as lim:           # a wall-clock limit; a part or config past it is cut
        ...                             # (lim.cut is True afterwards), the code after it goes on
    sink.add(row)                       # a row is on disk the moment it exists
    guarded(sink, {"config": name}, fn) # fn's exception becomes that row's error, not the run's

Limits nest (a part's limit holds its configs' limits) and are SIGALRM timers, so they reach
code that never checks a clock (a compile, a long step). `Cut` and `HardStop` derive from
BaseException: the `except Exception` guards inside a part record one config's failure and go
on, but must not swallow the signal that the part's (or the whole run's) time is up. SIGINT
(what `timeout --signal=INT` sends) and SIGTERM raise HardStop instead of KeyboardInterrupt, so
the runner writes gpu_all.json and the table before it exits. Main thread only.

Python and torch swallow some of these raises: an exception in a weakref callback (gc inside
`clean_up`) is printed and dropped, and dynamo runs parts of a compile under its own `try`.
So a raise is not assumed to arrive: until the limit's block has exited (or the run has
stopped), the timer fires again every RETRY_S and raises again.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch


class Cut(BaseException):
    """A wall-clock limit ran out; `limit` is the one that did."""

    def __init__(self, limit: "Limit"):
        super().__init__(f"cut after {limit.seconds:.1f} s ({limit.what})")
        self.limit = limit


class HardStop(BaseException):
    """The run was told to stop (SIGINT or SIGTERM): write what exists and exit."""


class Limit:
    def __init__(self, seconds: Optional[float], what: str):
        if seconds is not None and not math.isfinite(seconds):
            seconds = None
        self.seconds, self.what = seconds, what
        self.t0 = time.monotonic()
        self.deadline = None if seconds is None else self.t0 + max(seconds, 0.0)
        self.cut = False
        self.raised_at = None   # when its Cut was last raised (its block has not ended yet)

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


_ACTIVE: list[Limit] = []
RETRY_S = 0.5                    # a swallowed Cut or HardStop is raised again this long after
_STOPPED: Optional[str] = None   # why the run was told to stop, once it was


def _arm() -> None:
    """Set the one real timer to the earliest active deadline (or off)."""
    if _STOPPED:   # stopping: keep raising until quiet()
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        return
    deadlines = [lim.deadline if lim.raised_at is None else lim.raised_at + RETRY_S
                 for lim in _ACTIVE if lim.deadline is not None]
    if not deadlines:
        signal.setitimer(signal.ITIMER_REAL, 0)
        return
    signal.setitimer(signal.ITIMER_REAL, max(min(deadlines) - time.monotonic(), 1e-3))


def _on_alarm(signum, frame) -> None:
    if _STOPPED:   # the stop was swallowed: raise it again
        _arm()
        raise HardStop(_STOPPED)
    now = time.monotonic()
    expired = [lim for lim in _ACTIVE if lim.deadline is not None and lim.deadline <= now + 1e-3]
    if not expired:   # woke a little early: wait for the rest
        _arm()
        return
    expired[0].raised_at = now   # raised again RETRY_S from now, until `limited` catches it
    _arm()
    raise Cut(expired[0])   # the outermost: every limit inside it is over too


def _on_stop(signum, frame) -> None:
    global _STOPPED
    _STOPPED = f"stopped by {signal.Signals(signum).name}"
    _arm()   # raised again every RETRY_S until quiet() turns the timer off
    raise HardStop(_STOPPED)


def install_handlers() -> None:
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGINT, _on_stop)
    signal.signal(signal.SIGTERM, _on_stop)


def quiet() -> None:
    """From here on nothing interrupts: the final JSON and table are being written."""
    _ACTIVE.clear()
    signal.setitimer(signal.ITIMER_REAL, 0)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def limited(seconds: Optional[float], what: str = ""):
    """Run the block for at most `seconds` (None: no limit of its own; outer limits still hold).
    A block past its limit stops where it is; lim.cut says so and the code after the block runs."""
    lim = Limit(seconds, what)
    _ACTIVE.append(lim)
    _arm()
    try:
        yield lim
    except Cut as err:
        if err.limit is not lim:
            raise
        lim.cut = True
    finally:
        if lim in _ACTIVE:
            _ACTIVE.remove(lim)
        _arm()


@contextlib.contextmanager
def limited_row(sink: Sink, base: dict, seconds: Optional[float], what: str):
    """A preset's block under its own limit. Whether that limit cuts it or an outer one (the
    part's, the run's) passes through it, the preset's row says so: the last row with `base`'s
    fields, else a new one. The outer Cut then goes on up."""
    try:
        with limited(seconds, what) as lim:
            yield lim
    except Cut as err:
        mark_cut(sink, base, err.limit)
        raise
    if lim.cut:
        mark_cut(sink, base, lim)


def mark_cut(sink: Sink, base: dict, lim: Limit) -> None:
    """Quick (a Cut is raised again RETRY_S on): the row is complete before it is written."""
    rows = [r for r in sink.rows if all(r.get(k) == v for k, v in base.items())]
    row = rows[-1] if rows else dict(base)
    row["cut"] = f"cut after {lim.elapsed():.0f} s ({lim.what})" + (f" while {row['stage']}" if "stage" in row else "")
    if rows:
        sink.save()
    else:
        sink.add(row)


def clean_up(device: torch.device) -> None:
    """State a failed or cut block may leave behind, undone before the next one starts."""
    steps = [gc.collect]
    if device.type == "cuda":
        steps = [lambda: torch.cuda.set_sync_debug_mode("default"), gc.collect,
                 lambda: torch.cuda.synchronize(device), torch.cuda.empty_cache]
    for step in steps:
        try:   # a broken CUDA context fails here too: the next block records that, not this one
            step()
        except Exception:
            pass


def error_fields(err: BaseException) -> dict:
    """A failure as row fields: the full text for the JSON (the table prints a capped note)."""
    oom = isinstance(err, torch.OutOfMemoryError)
    return {"error": ("out of memory: " if oom else "") + f"{type(err).__name__}: {err}",
            "error_kind": "oom" if oom else "exception",
            "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=6))}


class Sink:
    """One part's rows. add() and save() write DIR/gpu_<part>.json and call `on_change` (the
    runner rewrites gpu_all.json there), so a row survives whatever comes after it."""

    def __init__(self, part: str, out: Optional[Path], meta: dict, on_change: Callable[[], None] = lambda: None):
        self.part, self.out, self.meta, self.on_change = part, out, meta, on_change
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        if self.out is not None:
            write_json_atomic(self.out / f"gpu_{self.part}.json",
                              {"meta": self.meta, "seconds": time.perf_counter() - self.t0, "rows": self.rows})
        self.on_change()


def guarded(sink: Sink, base: dict, fn: Callable[[], Optional[dict]], device: torch.device) -> Optional[dict]:
    """fn() -> its row (added here, unless fn added it itself), or None. Any exception of fn,
    out-of-memory or other, becomes an error row with `base`'s fields; the rows before it stay."""
    try:
        row = fn()
    except Exception as err:   # one config or implementation, not the part
        traceback.print_exc()
        row = sink.add({**base, **error_fields(err)})
        clean_up(device)
        return row
    if row is not None and not any(r is row for r in sink.rows):
        sink.add(row)
    return row


def write_json_atomic(path: Path, data) -> None:
    """Write-then-rename: a run killed mid-write leaves the previous file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
