"""Figures and one HTML page comparing runs, from their metrics.jsonl and config.yaml (no network).

    python -m evaluation.report RUN_DIR [RUN_DIR ...] --out DIR [--name LABEL ...] [--smooth 5]

Writes DIR/index.html and these PNGs (a figure whose data no run has is skipped and the page
says so):
    loss.png        training and validation ELBO against tokens, every run on one figure
    loss_bins.png   validation loss per mask-ratio bin over training, one panel per run
    efficiency.png  learning efficiency eta_r = -d ln L_r / d tokens per bin: over training, and
                    its mean per bin (the low-mask-ratio bins learn fastest)
    capacity.png    the capacity schedules k(r) with their expected k
    moe.png         expert load CV and drop fraction per layer over training
    tasks.png       generation-task exact match (eval/<task>/exact_match) over training
    sources.png     data mixtures (only when a run has one): training loss, validation loss and tokens seen per source
and, when some runs were started by init.from, a table of drop fraction and load CV per layer:
the other runs' last value against each started run's first and last value (before and after
a router swap).
"""
from __future__ import annotations

import argparse
import html
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import matplotlib
matplotlib.use("Agg")   # files only; no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from evaluation.report_sources import fig_sources, source_names  # noqa: E402

TOKENS = "tokens seen"
TOKENS_FMT = EngFormatter(places=0, sep="")


@dataclass
class Run:
    label: str
    path: str
    rows: list
    cfg: Optional[object] = None          # RunConfig, or None if the config could not be read
    notes: list = field(default_factory=list)

    def series(self, key: str) -> tuple:
        """(tokens, values) of the rows that have `key` (non-null), in step order."""
        pts = [(r["tokens"], r[key]) for r in self.rows if r.get(key) is not None and "tokens" in r]
        if not pts:
            return np.zeros(0), np.zeros(0)
        t, v = zip(*pts)
        return np.asarray(t, dtype=float), np.asarray(v, dtype=float)

    def keys(self, prefix: str) -> list:
        return sorted({k for r in self.rows for k in r if k.startswith(prefix)})

    @property
    def router(self) -> str:
        return self.cfg.moe.router if self.cfg else "?"


def router_tag(cfg) -> str:
    if cfg is None:
        return "?"
    m = cfg.moe
    if m.router == "expert_choice":
        return f"EC {m.capacity.schedule}"
    return "TC" if m.router == "token_choice" else "dense"


def load_runs(paths: list, names: Optional[list] = None) -> list:
    from rundir.config import load_config
    from trainer.metrics import decode_row   # "nan" / "inf" / "-inf" back to floats
    runs = []
    for i, path in enumerate(paths):
        mpath = os.path.join(path, "metrics.jsonl")
        if not os.path.exists(mpath):
            raise FileNotFoundError(f"{path}: no metrics.jsonl (is this a run directory?)")
        with open(mpath) as f:
            rows = sorted((decode_row(json.loads(line)) for line in f if line.strip()), key=lambda r: r.get("step", 0))
        cfg, notes = None, []
        try:
            cfg = load_config(os.path.join(path, "config.yaml"))
        except Exception as err:   # an old or foreign config: the figures that need it skip this run
            notes.append(f"config not read: {err}")
        base = names[i] if names and i < len(names) else (cfg.train.run_name if cfg else os.path.basename(path))
        runs.append(Run(base, path, rows, cfg, notes))
    labels = [r.label for r in runs]
    for r in runs:   # same run_name twice (a sweep): tell them apart by directory, then by router
        if not names and labels.count(r.label) > 1:
            r.label = os.path.basename(os.path.normpath(r.path))
        if not names:
            r.label = f"{r.label} ({router_tag(r.cfg)})"
    return runs


# ---- the learning-efficiency estimate ------------------------------------------------------------
def local_slope(x: np.ndarray, y: np.ndarray, window: int) -> np.ndarray:
    """d y / d x at every point by least squares over a centred window of `window` points
    (shrunk at the ends): a derivative that is smoothed, not amplified, by noise."""
    n, half = len(x), max(1, window // 2)
    out = np.full(n, np.nan)
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        if hi - lo >= 2 and np.ptp(x[lo:hi]) > 0:
            out[i] = np.polyfit(x[lo:hi], y[lo:hi], 1)[0]
    return out


def bin_series(run: Run) -> tuple:
    """(source name, [(bin index, tokens, loss)]) from validation bins, or training bins when a
    run has fewer than three evaluations."""
    for src in ("val", "train"):
        keys = run.keys(f"{src}/loss_bin/")
        data = [(int(k.rsplit("/", 1)[1]), *run.series(k)) for k in keys]
        data = [d for d in data if len(d[1]) >= 3]
        if data:
            return src, data
    return None, []


def efficiency(tokens: np.ndarray, loss: np.ndarray, window: int) -> np.ndarray:
    """eta = -d ln L / d tokens, per million tokens."""
    return -local_slope(tokens, np.log(np.clip(loss, 1e-12, None)), window) * 1e6


# ---- figures ------------------------------------------------------------------------------------
def _finish(fig, ax_list, path: str) -> str:
    for ax in ax_list:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _colors(n: int) -> list:
    return [plt.get_cmap("tab10")(i % 10) for i in range(n)]


def fig_loss(runs: list, out: str) -> Optional[str]:
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    drawn = False
    for run, c in zip(runs, _colors(len(runs))):
        for ax, key in ((a, "train/loss"), (b, "val/loss")):
            t, v = run.series(key)
            if len(t):
                ax.plot(t, v, color=c, marker="." if len(t) < 40 else None, label=run.label)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, title in ((a, "Training loss"), (b, "Validation loss (fixed mask-ratio grid)")):
        ax.set(title=title, xlabel=TOKENS, ylabel="ELBO loss (nats/token)")
        ax.xaxis.set_major_formatter(TOKENS_FMT)
        ax.legend(title="run")
    fig.suptitle("Loss against tokens")
    return _finish(fig, (a, b), os.path.join(out, "loss.png"))


def _bin_colorbar(fig, axes, n_bins: int):
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, 1))
    cb = fig.colorbar(sm, ax=axes, pad=0.01)
    cb.set_label(f"mask ratio r (bin of {1 / n_bins:.2g})")


def _panels(n: int, sharey: bool = True):
    """n axes in a grid of at most three columns (extra cells hidden)."""
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.8 * cols + 1, 4.3 * rows), squeeze=False, sharey=sharey)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _bin_legend(ax, lines: dict, run_label: str) -> None:
    """Name the run and only the extreme bins: the colour bar gives the rest."""
    lo, hi = min(lines), max(lines)
    ax.legend([lines[lo], lines[hi]],
              [f"lowest r bin ({lines[lo].get_label()})", f"highest r bin ({lines[hi].get_label()})"],
              fontsize=8, title=f"run {run_label}", title_fontsize=8)


def fig_loss_bins(runs: list, out: str) -> Optional[str]:
    series = [(run, *bin_series(run)) for run in runs]
    series = [s for s in series if s[2]]
    if not series:
        return None
    fig, axes = _panels(len(series))
    for ax, (run, src, data) in zip(axes, series):
        n = max(b for b, _, _ in data) + 1
        lines = {b: ax.plot(t, v, color=plt.cm.viridis(b / max(n - 1, 1)),
                            label=f"r in [{b / n:.1f}, {(b + 1) / n:.1f})")[0] for b, t, v in data}
        ax.set(title=f"{run.label}: {src} loss per mask-ratio bin", xlabel=TOKENS, ylabel="ELBO loss (nats/token)")
        ax.xaxis.set_major_formatter(TOKENS_FMT)
        _bin_legend(ax, lines, run.label)
    fig.suptitle("Loss by mask ratio over training")
    fig.tight_layout()
    _bin_colorbar(fig, axes, n)
    fig.savefig(os.path.join(out, "loss_bins.png"), dpi=110)
    plt.close(fig)
    return os.path.join(out, "loss_bins.png")


def efficiency_table(runs: list, window: int) -> list:
    """Per run: (run, source, {bin: (tokens, eta curve)}, {bin: mean eta over training})."""
    table = []
    for run in runs:
        src, data = bin_series(run)
        if not data:
            continue
        curves = {b: (t, efficiency(t, v, window)) for b, t, v in data}
        # the mean rate over the whole span is the net change of ln L over the tokens it took
        means = {b: -(np.log(v[-1]) - np.log(v[0])) / (t[-1] - t[0]) * 1e6 for b, t, v in data if t[-1] > t[0]}
        table.append((run, src, curves, means))
    return table


def fig_efficiency(runs: list, out: str, window: int) -> Optional[str]:
    table = efficiency_table(runs, window)
    if not table:
        return None
    fig, axes = _panels(len(table) + 1, sharey=False)
    for ax, (run, src, curves, _) in zip(axes, table):
        n = max(curves) + 1
        lines = {b: ax.plot(t, eta, color=plt.cm.viridis(b / max(n - 1, 1)),
                            label=f"r in [{b / n:.1f}, {(b + 1) / n:.1f})")[0]
                 for b, (t, eta) in sorted(curves.items())}
        ax.axhline(0, color="k", lw=0.6)
        ax.set(title=f"{run.label}: eta_r ({src} bins)", xlabel=TOKENS,
               ylabel="eta_r = -d ln L_r / d tokens (per 1M tokens)")
        ax.xaxis.set_major_formatter(TOKENS_FMT)
        _bin_legend(ax, lines, run.label)
    ax = axes[-1]
    for (run, src, _, means), c in zip(table, _colors(len(table))):
        n = max(means) + 1 if means else 1
        bins = sorted(means)
        ax.plot([(b + 0.5) / n for b in bins], [means[b] for b in bins], marker="o", color=c, label=run.label)
    ax.set(title="Mean eta_r over training, by mask ratio", xlabel="mask ratio r (bin centre)",
           ylabel="mean eta_r (per 1M tokens)")
    ax.legend(title="run")
    fig.suptitle(f"Learning efficiency per mask-ratio bin (local slope over {window} evaluations)")
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    _bin_colorbar(fig, axes[:-1], max(max(curves) for _, _, curves, _ in table) + 1)
    fig.savefig(os.path.join(out, "efficiency.png"), dpi=110)
    plt.close(fig)
    return os.path.join(out, "efficiency.png")


def capacity_curves(run: Run) -> Optional[tuple]:
    """(r grid, k(r), E[k], description) for EC runs, a flat k for TC, None for dense/unknown."""
    if run.cfg is None or run.cfg.moe.router == "dense":
        return None
    r = np.linspace(0, 1, 1001)
    m = run.cfg.moe
    if m.router == "token_choice":
        return r, np.full_like(r, m.k), float(m.k), f"token choice top-{m.k}"
    import torch
    cap = run.cfg.model_config.capacity   # the run's one schedule, built when its config loaded
    k = cap.k(torch.as_tensor(r)).numpy().astype(float)
    return r, k, cap.expected_k(), f"{cap.schedule}, k in [{cap.k_min:g}, {cap.k_max:g}]"


def fig_capacity(runs: list, out: str) -> Optional[str]:
    curves = [(run, capacity_curves(run)) for run in runs]
    curves = [(run, c) for run, c in curves if c is not None]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, ((run, (r, k, ek, desc)), c) in enumerate(zip(curves, _colors(len(curves)))):
        # later runs drawn thinner on top, so identical schedules stay visible as nested lines
        ax.plot(r, k, color=c, lw=max(1.0, 3.5 - 0.9 * i), label=f"{run.label}: {desc}")
        ax.axhline(ek, color=c, ls="--", lw=1, label=f"{run.label}: E[k] = {ek:.2f}")
    ax.set(title="Capacity schedules k(r) and expected k (r ~ U(0, 1))", xlabel="mask ratio r",
           ylabel="experts per token k")
    ax.legend(fontsize=8)
    return _finish(fig, [ax], os.path.join(out, "capacity.png"))


def fig_moe(runs: list, out: str) -> Optional[str]:
    have = [run for run in runs if run.keys("moe/load_cv/") or run.keys("moe/drop_frac/")]
    if not have:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run, c in zip(have, _colors(len(have))):
        for ax, prefix in zip(axes, ("moe/load_cv/", "moe/drop_frac/")):
            layers = [run.series(k) for k in run.keys(prefix)]
            layers = [s for s in layers if len(s[0])]
            if not layers:
                continue
            for t, v in layers:   # thin: each layer; bold: the mean over layers
                ax.plot(t, v, color=c, lw=0.6, alpha=0.35)
            n = min(len(t) for t, _ in layers)
            ax.plot(layers[0][0][:n], np.mean([v[:n] for _, v in layers], 0), color=c, lw=2,
                    label=f"{run.label} (mean of {len(layers)} layers)")
    axes[0].set(title="Expert load imbalance per layer", xlabel=TOKENS,
                ylabel="load CV = std/mean of tokens per expert (ratio)")
    axes[1].set(title="Dropped fraction per layer\n(EC: tokens no expert chose; TC: over-capacity assignments)",
                xlabel=TOKENS, ylabel="dropped fraction (0 to 1)")
    for ax in axes:
        ax.xaxis.set_major_formatter(TOKENS_FMT)
        ax.legend(fontsize=8, title="run (thin lines: single layers)", title_fontsize=8)
    fig.suptitle("MoE routing statistics over training")
    return _finish(fig, axes, os.path.join(out, "moe.png"))


def fig_tasks(runs: list, out: str) -> Optional[str]:
    """Generation-task accuracy (eval/<task>/exact_match) over training, one panel per task."""
    tasks = sorted({k for run in runs for k in run.keys("eval/") if k.endswith("/exact_match")})
    if not tasks:
        return None
    fig, axes = _panels(len(tasks), sharey=True)
    for ax, key in zip(axes, tasks):
        for run, c in zip(runs, _colors(len(runs))):
            t, v = run.series(key)
            if len(t):
                ax.plot(t, v, color=c, marker="o", label=run.label)
        ax.set(title=f"{key.split('/')[1]}: held-out exact match", xlabel=TOKENS, ylabel="exact match (0 to 1)",
               ylim=(-0.03, 1.03))
        ax.xaxis.set_major_formatter(TOKENS_FMT)
        ax.legend(fontsize=8, title="run", title_fontsize=8)
    fig.suptitle("Generation-task accuracy over training")
    return _finish(fig, axes, os.path.join(out, "tasks.png"))


def swap_table(runs: list) -> list:
    """Drop fraction and load CV per layer before and after a router swap: each run started by
    init.from (a retrofit or a fine-tune) gives its first and last logged value, next to the
    last logged value of the source runs among `runs` (those not started from another run).
    Rows: {"metric", "layer", "<label> last" for sources, "<label> first/last" for the others}."""
    started = [r for r in runs if r.cfg is not None and r.cfg.init.source]
    sources = [r for r in runs if r not in started]
    if not started:
        return []
    rows = []
    for metric in ("drop_frac", "load_cv"):
        keys = sorted({k for r in runs for k in r.keys(f"moe/{metric}/")})
        for key in keys:
            row = {"metric": metric, "layer": key.rsplit("/", 1)[1]}
            for r in sources:
                v = r.series(key)[1]
                row[f"{r.label} last"] = float(v[-1]) if len(v) else None
            for r in started:
                v = r.series(key)[1]
                row[f"{r.label} first"] = float(v[0]) if len(v) else None
                row[f"{r.label} last"] = float(v[-1]) if len(v) else None
            rows.append(row)
    return rows


def html_table(rows: list) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v if v is not None else "-"))
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# ---- the page -----------------------------------------------------------------------------------
CAPTIONS = {
    "loss.png": "Training and validation ELBO loss against tokens seen, every run on the same axes.",
    "loss_bins.png": "Validation loss per mask-ratio bin over training (lighter colour = higher mask ratio).",
    "efficiency.png": "Learning efficiency eta_r = -d ln L_r / d tokens for each mask-ratio bin, smoothed by a "
                      "local linear fit; right: its mean over training per bin.",
    "capacity.png": "Expert-choice capacity schedules k(r) (solid) with their expected k under r ~ U(0, 1) "
                    "(dashed); token choice shown as its fixed top-k.",
    "moe.png": "Expert load coefficient of variation and dropped fraction, per MoE layer (thin) and averaged (bold).",
    "sources.png": "Data mixture: each source's training loss (from its sequences in the batch), validation "
                   "loss on its own validation split (same mask-ratio grid as val/loss) and tokens seen.",
    "tasks.png": "Held-out exact match of greedy generation (eval.tasks with mode: generate) over training.",
}


def summary_rows(runs: list, window: int) -> list:
    eta = {id(run): means for run, _, _, means in efficiency_table(runs, window)}
    rows = []
    for run in runs:
        last = lambda key: (run.series(key)[1][-1] if len(run.series(key)[1]) else None)  # noqa: E731
        tokens = max((r.get("tokens", 0) for r in run.rows), default=0)
        means = eta.get(id(run), {})
        ratio = (means[min(means)] / means[max(means)]
                 if len(means) >= 2 and means[max(means)] > 0 else None)
        rows.append({"run": run.label, "directory": run.path, "router": router_tag(run.cfg),
                     "steps": max((r.get("step", 0) for r in run.rows), default=0), "tokens": tokens,
                     "train loss": last("train/loss"), "val loss": last("val/loss"),
                     "eta lowest/highest r bin": ratio})
    return rows


def write_html(runs: list, figures: list, missing: list, out: str, window: int) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v if v is not None else "-"))
    rows = summary_rows(runs, window)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    figs = "".join(f'<figure><img src="{os.path.basename(p)}" alt="{os.path.basename(p)}">'
                   f"<figcaption>{html.escape(CAPTIONS[os.path.basename(p)])}</figcaption></figure>" for p in figures)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in missing + [f"{r.label}: {n}" for r in runs for n in r.notes])
    swap = swap_table(runs)
    swap_html = ("<h2>Routing before and after the swap</h2><p>Per MoE layer: the source runs' last logged "
                 "value against each run started by init.from at its first and last logged step.</p>"
                 + html_table(swap)) if swap else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ecdlm report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1500px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}} img{{max-width:100%}}
figure{{margin:2em 0}} figcaption{{color:#444}}</style></head>
<body><h1>ecdlm run report</h1>
<table><tr>{head}</tr>{body}</table>
{f"<ul>{notes}</ul>" if notes else ""}
{swap_html}
{figs}
</body></html>
"""
    path = os.path.join(out, "index.html")
    with open(path, "w") as f:
        f.write(page)
    return path


def build_report(run_dirs: list, out: str, names: Optional[list] = None, window: int = 5) -> dict:
    """Writes the figures and index.html; returns {"html": path, "figures": [...], "skipped": [...]}."""
    os.makedirs(out, exist_ok=True)
    runs = load_runs(run_dirs, names)
    makers = {"loss.png": lambda: fig_loss(runs, out), "loss_bins.png": lambda: fig_loss_bins(runs, out),
              "efficiency.png": lambda: fig_efficiency(runs, out, window),
              "capacity.png": lambda: fig_capacity(runs, out), "moe.png": lambda: fig_moe(runs, out),
              "tasks.png": lambda: fig_tasks(runs, out)}
    if any(source_names(run) for run in runs):   # only data-mixture runs have it; not "skipped" for others
        makers["sources.png"] = lambda: fig_sources(runs, out, _colors, _finish, TOKENS, TOKENS_FMT)
    figures, skipped = [], []
    for name, make in makers.items():
        path = make()
        (figures.append(path) if path else skipped.append(f"{name}: no run has the data for it"))
    return {"html": write_html(runs, figures, skipped, out, window), "figures": figures, "skipped": skipped}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Figures and an HTML page comparing ecdlm runs.")
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl and config.yaml)")
    p.add_argument("--out", required=True, help="output directory for the PNGs and index.html")
    p.add_argument("--name", action="append", help="label for each run, in order (default: run name + router)")
    p.add_argument("--smooth", type=int, default=5, help="evaluations per local slope for eta_r")
    args = p.parse_args(argv)
    try:
        res = build_report(args.runs, args.out, args.name, args.smooth)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {res['html']} with {len(res['figures'])} figures" +
          (f"; skipped: {'; '.join(res['skipped'])}" if res["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
