"""evaluation/report.py on SFT runs: the task-accuracy figure and the before/after-swap table,
from hand-written run directories (metrics.jsonl + a real saved config.yaml)."""
from __future__ import annotations

import json

from evaluation.report import build_report, load_runs, swap_table
from rundir.config import load_config, save_config


def fake_run(path, rows, **over):
    path.mkdir(parents=True)
    cfg = load_config("configs/tiny.yaml", tuple(f"{k}={v}" for k, v in over.items()))
    save_config(cfg, str(path / "config.yaml"))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def runs(tmp_path):
    tc = fake_run(tmp_path / "tc", [
        {"step": 10, "tokens": 100, "train/loss": 5.0, "moe/drop_frac/layer00": 0.0, "moe/load_cv/layer00": 0.9},
        {"step": 20, "tokens": 200, "train/loss": 4.0, "moe/drop_frac/layer00": 0.0, "moe/load_cv/layer00": 0.7}],
        **{"moe.router": "token_choice", "moe.capacity.schedule": "static", "train.run_name": "tc"})
    ec = fake_run(tmp_path / "ec", [
        {"step": 0, "tokens": 0, "moe/drop_frac/layer00": 0.4, "moe/load_cv/layer00": 0.0},
        {"step": 5, "tokens": 50, "eval/copy/exact_match": 0.25},
        {"step": 10, "tokens": 100, "train/loss": 1.0, "eval/copy/exact_match": 0.75,
         "moe/drop_frac/layer00": 0.2, "moe/load_cv/layer00": 0.0}],
        **{"init.from": str(tmp_path / "tc"), "train.run_name": "ec"})
    return tc, ec


def test_swap_table_gives_source_last_and_retrofit_first_and_last(tmp_path):
    tc, ec = runs(tmp_path)
    rows = swap_table(load_runs([tc, ec], ["TC", "EC"]))
    assert rows == [{"metric": "drop_frac", "layer": "layer00", "TC last": 0.0, "EC first": 0.4, "EC last": 0.2},
                    {"metric": "load_cv", "layer": "layer00", "TC last": 0.7, "EC first": 0.0, "EC last": 0.0}]


def test_no_started_run_no_table_and_no_task_figure(tmp_path):
    tc, _ = runs(tmp_path)
    assert swap_table(load_runs([tc])) == []
    res = build_report([tc], str(tmp_path / "out"))
    assert "tasks.png: no run has the data for it" in res["skipped"]
    assert "before and after the swap" not in open(res["html"]).read()


def test_report_draws_task_accuracy_and_the_table(tmp_path):
    tc, ec = runs(tmp_path)
    res = build_report([tc, ec], str(tmp_path / "out"), ["TC", "EC"])
    assert any(p.endswith("tasks.png") for p in res["figures"])
    page = open(res["html"]).read()
    assert "Routing before and after the swap" in page and "<th>EC first</th>" in page and "<td>0.4</td>" in page
