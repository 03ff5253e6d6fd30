"""Metric sinks: a concise rank-0 console line, metrics.jsonl in the run directory, and W&B.

All sinks receive the same flat dict of names grouped by prefix (train/, val/, moe/, perf/), with
`step` and `tokens`; W&B uses `tokens` as the x-axis. Only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid

log = logging.getLogger("ecdlm")


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ConsoleSink:
    def __init__(self, max_steps: int, start_step: int):
        self.max_steps, self.start_step, self.t0 = max_steps, start_step, time.time()

    def log(self, row: dict) -> None:
        step = row["step"]
        done = step - self.start_step
        eta = (time.time() - self.t0) / max(done, 1) * (self.max_steps - step)
        parts = [f"step {step}/{self.max_steps}"]
        for key, label, fmt in (("train/loss", "loss", ".4f"), ("val/loss", "val", ".4f"),
                                ("train/grad_norm", "gnorm", ".3f"), ("train/lr", "lr", ".2e"),
                                ("moe/mean_k", "k", ".2f"), ("perf/tokens_per_s", "tok/s", ",.0f"),
                                ("perf/mfu", "mfu", ".1%")):
            if row.get(key) is not None:
                parts.append(f"{label} {row[key]:{fmt}}")
        if done > 0:   # no rate to extrapolate before the first step
            parts.append(f"eta {_fmt_duration(eta)}")
        log.info(" | ".join(parts))


class JsonlSink:
    def __init__(self, path: str, resume_step: int = 0):
        drop_rows_after(path, resume_step)
        self.f = open(path, "a", buffering=1)

    def log(self, row: dict) -> None:
        self.f.write(json.dumps(encode_row(row)) + "\n")

    def close(self) -> None:
        self.f.close()


# metrics.jsonl spells non-finite numbers as these strings: null means "not logged", and bare NaN /
# Infinity are not JSON (jq and most readers refuse them)
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def encode_row(row: dict) -> dict:
    return {k: (("nan" if math.isnan(v) else "inf" if v > 0 else "-inf")
                if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def decode_row(row: dict) -> dict:
    """A metrics.jsonl row with "nan", "inf" and "-inf" read back as floats."""
    return {k: (_NONFINITE[v] if isinstance(v, str) and v in _NONFINITE else v) for k, v in row.items()}


def read_rows(path: str) -> list:
    """Every row of a metrics.jsonl file, decoded."""
    with open(path) as f:
        return [decode_row(json.loads(line)) for line in f if line.strip()]


def drop_rows_after(path: str, step: int) -> None:
    """A run resumed at `step` recomputes later steps: drop their old rows so each step appears once."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def wandb_mode(configured: str) -> str:
    """auto: online when an API key is configured (env or netrc), else offline."""
    if configured != "auto":
        return configured
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


class WandbSink:
    """One W&B run per run directory: its id is kept in the run directory, so a resumed or
    requeued job continues the same charts."""

    def __init__(self, cfg, run_dir: str, mode: str):
        import wandb
        id_path = os.path.join(run_dir, "wandb_run_id")
        if os.path.exists(id_path):
            run_id = open(id_path).read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_path + ".tmp", "w") as f:
                f.write(run_id)
            os.replace(id_path + ".tmp", id_path)
        w = cfg.wandb
        self.run = wandb.init(project=w.project, entity=w.entity, group=w.group, tags=list(w.tags) or None,
                              name=cfg.train.run_name, id=run_id, resume="allow", mode=mode,
                              dir=run_dir, config=cfg.to_dict())
        self.run.define_metric("tokens")
        self.run.define_metric("*", step_metric="tokens")

    def log(self, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if v is not None})

    def close(self) -> None:
        self.run.finish()


class Metrics:
    """Fans a row out to every sink; a no-op on ranks other than 0."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, row: dict) -> None:
        for s in self.sinks:
            s.log(row)

    def close(self) -> None:
        for s in self.sinks:
            if hasattr(s, "close"):
                s.close()


def build_metrics(cfg, run_dir: str, rank: int, start_step: int) -> Metrics:
    if rank != 0:
        return Metrics([])
    sinks = [ConsoleSink(cfg.train.max_steps, start_step), JsonlSink(os.path.join(run_dir, "metrics.jsonl"), start_step)]
    mode = wandb_mode(cfg.wandb.mode)
    if mode != "disabled":
        sinks.append(WandbSink(cfg, run_dir, mode))
    return Metrics(sinks)
