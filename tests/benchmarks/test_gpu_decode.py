"""benchmarks/gpu_decode.py (the GPU measurement's `decode` part) at toy shapes on the CPU: it
runs, every row has its numbers, and the cached settings compute what the plain one does in NFE."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks import gpu_decode


def test_decode_part_runs_at_toy_shapes_on_cpu():
    torch.set_num_threads(1)
    rows = gpu_decode.run(SimpleNamespace(smoke=True, repeat=1, warmup=0))
    cases = {(r["config"], r["batch"], r["setting"]) for r in rows}
    assert cases == {(c, b, s) for c in ("owt_ec", "owt_tc") for b in (1, 4) for s in gpu_decode.SETTINGS}
    for r in rows:
        assert r["part"] == "decode" and r["device"] == "cpu" and r["tokens_per_s"] > 0 and r["seconds"] > 0
        if r["setting"] != "threshold+dual":   # fixed: one token per step, with or without the cache
            assert r["nfe"] == r["gen_length"] == 16
        else:
            assert 2 <= r["nfe"] <= 16    # at least one step per block, at most one token per step
    assert all(r["speedup_vs_plain"] == 1.0 for r in rows if r["setting"] == "plain")
