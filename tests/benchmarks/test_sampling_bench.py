"""benchmarks/sampling.py runs end to end at toy lengths (--quick): every setting of every model
it trains gets exact match, NFE and a time, the JSON records the machine and the load, and the
figure is written. Nothing here looks at a time's value."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sampling_benchmark_quick(tmp_path):
    out, fig = tmp_path / "s.json", tmp_path / "s.png"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sampling", "--quick", "--archs", "ec_linear_reverse,tc",
                           "--tasks", "copy", "--prompts", "4", "--repeat", "1", "--out", str(out), "--figure", str(fig)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    from benchmarks.sampling import SETTINGS
    assert {(r["arch"], r["setting"]) for r in doc["rows"]} == {(a, s) for a in ("ec_linear_reverse", "tc")
                                                                for s in SETTINGS}
    for r in doc["rows"]:
        assert 0 <= r["exact_match"] <= 1 and r["nfe"] >= 1 and r["tokens_per_s"] > 0 and "speed_vs_tc" in r
        assert r["nfe"] == 16 if r["setting"].startswith(("plain", "fixed")) else r["nfe"] <= 16
    assert doc["meta"]["machine"]["cpu_model"] and len(doc["meta"]["loadavg_start"]) == 3
    assert "partial" not in doc["meta"] and fig.stat().st_size > 0
