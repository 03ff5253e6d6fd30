"""The one table benchmarks/gpu.sh prints last: every part's rows, in a bounded width and length.

Only the last 12,000 characters of a lent machine's output come back, so the table stays well
under that: notes are capped (the full text of an error is in the JSON), the checks are folded
to one line per shape and kind (each failure named), and a table still too long loses its last
rows with a line that says how many. A part's module may define `table_rows(rows)` (a list of
dicts with the COLUMNS' keys); parts without one get `generic_rows`.
"""
from __future__ import annotations

from benchmarks.common import format_table

COLUMNS = [("part", "part", "s"), ("case", "case", "s"), ("ok", "ok", "s"), ("ms", "ms", ".2f"),
           ("tflop_per_s", "TFLOP/s", ".1f"), ("ratio_to_dense", "/dense", ".2f"), ("mfu", "MFU", ".1%"),
           ("tokens_per_s", "tokens/s", ".0f"), ("mem_gb", "peak GB", ".1f"), ("syncs", "syncs", "d"),
           ("note", "note", "s")]
NOTE_MAX = 72
CASE_MAX = 40
TABLE_MAX = 9000


def cap(text, n: int) -> str:
    text = " ".join(str(text).split())   # one line
    return text if len(text) <= n else text[:n - 3] + "..."


def error_note(row: dict) -> str:
    return "ERROR " + row["error"]


def ceilings_rows(rows):
    for r in rows:
        if "error" in r:
            yield {"case": "ceilings", "note": error_note(r)}
            continue
        yield {"case": f"matmul {r['matmul_n']}^3", "tflop_per_s": r["matmul"],
               "note": f"datasheet {r['datasheet']:.0f} TFLOP/s" if r.get("datasheet") else None}
        yield {"case": "device copy", "note": f"{r['copy_tb_per_s']:.2f} TB/s"}


def check_rows(rows):
    """One line per (shape, kind of check), failures named, errors and ties counted."""
    groups: dict = {}
    for r in rows:
        kind = r.get("check", "?").split("/")[0]
        groups.setdefault((r.get("shape", "?"), kind), []).append(r)
    for (shape, kind), rs in groups.items():
        bad = [r for r in rs if not r.get("ok")]
        names = [r.get("check", "?").split("/")[-1] + (" (raised)" if isinstance(r.get("error"), str) else "")
                 for r in bad]
        errs = [r["error"] for r in rs if isinstance(r.get("error"), float)]
        bounds = [r["bound"] for r in rs if "bound" in r]
        ties = sum(sum(r.get("ties", {}).values()) for r in rs)
        note = f"worst err {max(errs):.1e} < {max(bounds):.0e}" if errs and bounds else ""
        if ties:
            note += f"; {ties} ties left out"
        if any(r.get("skipped") for r in rs):
            note = rs[0].get("what", "skipped")
        if bad:
            first = next((r for r in bad if isinstance(r.get("error"), str)), None)
            note = "FAIL " + ", ".join(names) + (f": {first['error']}" if first else f"; {note}")
        yield {"case": f"{shape} {kind} {len(rs) - len(bad)}/{len(rs)}", "ok": "FAIL" if bad else "ok", "note": note}


def layer_rows(rows):
    for r in rows:
        case = f"{r.get('shape')} {r.get('impl')}" + (f" B={r['B']}" if "B" in r else "")
        if "error" in r:
            yield {"case": case, "note": error_note(r)}
            continue
        note = f"mean k {r['mean_k']:.2f}; {r.get('calls_per_sample', 1)} calls/sample"
        if r.get("experts_path", "default") != "default":
            note += "; per-expert loop forced"
        yield {"case": case, "ms": r["ms"], "tflop_per_s": r["tflop_per_s"], "ratio_to_dense": r.get("ratio_to_dense"),
               "note": note}


def router_rows(rows):
    for r in rows:
        case = f"owt router {r.get('precision')}"
        if "error" in r:
            yield {"case": case, "note": error_note(r)}
            continue
        parts = []
        if r.get("matmul_ms") is not None:
            parts.append(f"matmul {r['matmul_ms']:.3f} ms")
        for what in ("matmul", "route"):
            if f"{what}_error" in r:
                parts.append(f"{what} ERROR {r[what + '_error']}")
        parts.append(r.get("router_code", ""))
        yield {"case": case + " +select", "ms": r.get("route_ms"), "tflop_per_s": r.get("tflop_per_s"),
               "ratio_to_dense": r.get("ratio_to_dense"), "note": "; ".join(parts)}


def step_rows(rows):
    for r in rows:
        case = r["config"] + (f" B={r['B']} L={r['L']}" if "B" in r else "")
        if "ms" not in r:
            yield {"case": case, "note": error_note(r) if "error" in r else r.get("cut", "no timing")}
            continue
        syncs = r.get("cuda_syncs_per_step", r.get("counted_syncs_per_step"))
        note = (f"flash {'yes' if r.get('sdpa_flash') else 'NO'}; counted syncs {r.get('counted_syncs_per_step')} "
                f"({r.get('counted_syncs_in_moe_layers')} in {r.get('moe_layers')} MoE layers)")
        if "cut" in r or "error" in r:
            note = (r.get("cut") or error_note(r)) + "; " + note
        yield {"case": case, "ms": r["ms"], "tflop_per_s": r["tflop_per_s"], "mfu": r.get("mfu_datasheet"),
               "tokens_per_s": r["tokens_per_s"], "mem_gb": r.get("peak_mem_gb"), "syncs": syncs, "note": note}


def compile_rows(rows):
    for r in rows:
        case = r["config"] + (f" B={r['B']}" if "B" in r else "")
        trouble = r.get("cut") or (error_note(r) if "error" in r else None)
        if "eager_ms" not in r:
            yield {"case": case, "note": trouble or f"stopped while {r.get('stage')}"}
            continue
        yield {"case": case + " eager", "ms": r["eager_ms"], "tflop_per_s": r["eager_tflop_per_s"],
               "mfu": r.get("eager_mfu_datasheet"), "tokens_per_s": r["eager_tokens_per_s"],
               "note": r.get("reduced")}
        if "compiled_ms" in r:
            note = (f"{r['speedup']:.2f}x eager; compile {r['compile_s']:.0f} s; {r['graph_breaks']} breaks, "
                    f"{r['unique_graphs']} graphs; {r['recompiled_while_timed']} recompiled in timing")
            yield {"case": case + " compiled", "ms": r["compiled_ms"], "tflop_per_s": r["compiled_tflop_per_s"],
                   "mfu": r.get("compiled_mfu_datasheet"), "tokens_per_s": r["compiled_tokens_per_s"], "note": note}
        else:
            yield {"case": case + " compiled", "note": trouble or f"stopped while {r.get('stage')}"}


def graph_rows(rows):
    for r in rows:
        case = r["config"]
        if r.get("graph") == "not capturable":
            yield {"case": case, "ok": "no", "syncs": r.get("counted_syncs"), "note": "not capturable: " + r["reason"]}
            continue
        if "eager_ms" not in r:
            yield {"case": case, "note": error_note(r) if "error" in r else r.get("cut", "no timing")}
            continue
        sf = "sync_free" if r.get("sync_free") is True else r.get("sync_free")
        syncs = r.get("cuda_syncs", r.get("counted_syncs"))
        yield {"case": case + " eager", "ms": r["eager_ms"], "tokens_per_s": r["tokens_per_s_eager"], "syncs": syncs,
               "note": f"{sf}; counted syncs {r.get('counted_syncs')}"}
        if "graph_ms" in r:
            yield {"case": case + " graph", "ok": "ok", "ms": r["graph_ms"], "tokens_per_s": r["tokens_per_s_graph"],
                   "note": f"{r['speedup']:.2f}x eager; losses finite: {r['replay_losses_finite']}"}
        else:
            why = r.get("graph_error") or r.get("cut") or (error_note(r) if "error" in r else r.get("graph"))
            yield {"case": case + " graph", "ok": "no", "note": why}


def engine_rows(rows):
    for r in rows:
        case = r["config"] + (f" B={r['B']} L={r['L']}" if "B" in r else "")
        if "error" in r:
            yield {"case": case, "note": error_note(r)}
            continue
        yield {"case": case, "ms": r["ms"], "tflop_per_s": r["tflop_per_s"], "mfu": r.get("mfu_datasheet"),
               "tokens_per_s": r["tokens_per_s"], "mem_gb": r.get("peak_mem_gb"),
               "note": f"DeepSpeed ZeRO-{r['zero_stage']}, {r['precision']}"}


def generic_rows(rows):
    """For a part without its own table_rows: its name fields, common numbers, error or note."""
    for r in rows:
        case = r.get("case") or " ".join(str(r[k]) for k in ("config", "shape", "impl", "precision") if k in r)
        yield {"case": case or "-", **{k: r.get(k) for k in ("ok", "ms", "tflop_per_s", "tokens_per_s", "mem_gb")},
               "note": error_note(r) if "error" in r else r.get("note")}


FORMATTERS = {"ceilings": ceilings_rows, "check": check_rows, "layer": layer_rows, "router": router_rows,
              "step": step_rows, "compile": compile_rows, "graph": graph_rows, "engine": engine_rows}


def table_rows(results: dict, status: dict, formatters: dict) -> list[dict]:
    """results: part -> rows; status: part -> {"state", "why"}; formatters: part -> rows -> table rows.
    A formatter that raises costs only its part's lines (the JSON still has the rows)."""
    out = []
    for part, rows in results.items():
        fmt = formatters.get(part) or FORMATTERS.get(part) or generic_rows
        try:
            lines = list(fmt(rows))
        except Exception as err:   # the table must print
            lines = [{"case": "(table)", "note": f"ERROR formatting {part}'s rows: {type(err).__name__}: {err}"}]
        out += [{"part": part, **line} for line in lines]
    for part, st in status.items():
        if st.get("state") != "done":
            out.append({"part": part, "case": st.get("state", "?"), "note": st.get("why")})
    return out


def render(rows: list[dict], max_chars: int = TABLE_MAX) -> str:
    """The table, at most `max_chars`: notes shortened first, then trailing rows left out."""
    note_max = NOTE_MAX
    while True:
        shown = [{**r, "case": cap(r.get("case") or "-", CASE_MAX),
                  "note": cap(r["note"], note_max) if r.get("note") else None,
                  "syncs": r["syncs"] if isinstance(r.get("syncs"), int) else None} for r in rows]
        text = format_table(shown, COLUMNS)
        if len(text) <= max_chars or note_max <= 24:
            break
        note_max -= 16
    keep = len(shown)
    while len(text) > max_chars and keep > 1:
        keep = max(1, keep - max(1, (len(text) - max_chars) // 120))
        text = format_table(shown[:keep] + [{"part": "...", "case": f"{len(shown) - keep} rows more",
                                             "note": "see gpu_all.json"}], COLUMNS)
    return text
