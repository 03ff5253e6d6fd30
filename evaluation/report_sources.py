"""The report's data-mixture figure: per-source training loss, validation loss and tokens seen
(train/loss/<source>, val/loss/<source>, data/tokens/<source>, written by a run with data.mixture)."""
from __future__ import annotations

import os
from typing import Optional

import matplotlib.pyplot as plt

PANELS = (("train/loss/", "Training loss per source", "ELBO loss (nats/token)"),
          ("val/loss/", "Validation loss per source (own val split)", "ELBO loss (nats/token)"),
          ("data/tokens/", "Tokens seen per source", "tokens"))
STYLES = ("-", "--", ":", "-.")


def source_names(run) -> list:
    return sorted({k.split("/", 2)[2] for prefix, _, _ in PANELS for k in run.keys(prefix)})


def fig_sources(runs: list, out: str, colors, finish, tokens_label: str, tokens_fmt) -> Optional[str]:
    mixed = [(run, c) for run, c in zip(runs, colors(len(runs))) if source_names(run)]
    if not mixed:
        return None
    fig, axes = plt.subplots(1, len(PANELS), figsize=(17, 4.5))
    for ax, (prefix, title, ylabel) in zip(axes, PANELS):
        for run, c in mixed:
            for name, style in zip(source_names(run), STYLES * 8):
                t, v = run.series(prefix + name)
                if len(t):
                    ax.plot(t, v, color=c, linestyle=style, marker="." if len(t) < 40 else None,
                            label=f"{run.label}: {name}")
        ax.set(title=title, xlabel=tokens_label, ylabel=ylabel)
        ax.xaxis.set_major_formatter(tokens_fmt)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle("Data mixture: each source on its own")
    return finish(fig, axes, os.path.join(out, "sources.png"))
