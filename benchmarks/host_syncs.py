"""Host syncs, counted on any device: every place where the host would wait for the GPU.

    with HostSyncCounter() as sc:
        loss.backward()
    sc.total, sc.by_kind(), sc.by_site()

    python benchmarks/host_syncs.py [--json out.json]     # benchmarks/RESULTS.md's table

On a GPU the host queues kernels ahead of the device; anything that needs a device value on the
host (a Python number, a shape that depends on data, a host copy) stalls that queue until the
device catches up. `torch.cuda.set_sync_debug_mode` sees those only on a GPU. This counter sees
the same operations on the CPU, one level up, by what they are:
    read    aten._local_scalar_dense: .item(), bool(t), int(t), float(t), and `if t:`
    shape   ops whose output size depends on data: nonzero, masked_select, boolean indexing
            (x[mask], x[mask] = v), unique, repeat_interleave without output_size, bincount
            (CUDA's reads the max to size its output)
    host    .tolist(), .cpu(), .numpy() called from our code
    upload  tensors built from Python data (torch.tensor, as_tensor, new_tensor): a copy from
            pageable host memory, which CUDA makes blocking
Operators are seen through a TorchDispatchMode, so the backward is counted too (autograd carries
the mode into its engine). Each event is charged to the innermost frame of this repository's
code that caused it, so the table says where, not just how many.
"""
from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):   # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
_SELF = str(Path(__file__).resolve())

_SHAPE_OPS = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
              "unique_dim_consecutive", "bincount"}


def _is_bool(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def classify(func, args, kwargs) -> str | None:
    """The kind of host sync an aten call is, or None."""
    name = func._schema.name.removeprefix("aten::")
    if name == "_local_scalar_dense":
        return "read"
    if name in _SHAPE_OPS:
        return "shape"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return "shape" if any(_is_bool(i) for i in indices or ()) else None
    if name == "repeat_interleave" and isinstance(args[0] if args else None, torch.Tensor):
        return "shape" if kwargs.get("output_size") is None and len(args) < 4 else None
    if name == "lift_fresh":
        return "upload"
    return None


def call_site() -> str:
    """'path:line (function)' of the innermost frame in this repository outside this file."""
    for frame in reversed(traceback.extract_stack()):
        f = frame.filename
        if f.startswith(str(ROOT)) and f != _SELF and "/.venv/" not in f:
            return f"{Path(f).relative_to(ROOT)}:{frame.lineno} ({frame.name})"
    return "<outside the repository>"


class _Mode(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = classify(func, args, kwargs)
        if kind:
            self.counter.record(kind, func._schema.name.removeprefix("aten::"))
        return func(*args, **kwargs)


class HostSyncCounter:
    """Counts host syncs (see the module doc) while active; re-entrant use is not supported."""

    _HOST_METHODS = ("tolist", "cpu", "numpy")

    def __init__(self):
        self.events: list[tuple[str, str, str]] = []   # (kind, operator, call site)
        self._saved: dict = {}
        self._mode = _Mode(self)
        self.paused = False

    def record(self, kind: str, op: str) -> None:
        if not self.paused:
            self.events.append((kind, op, call_site()))

    def __enter__(self):
        for name in self._HOST_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(t, *a, __name=name, __original=original, **kw):
                self.record("host", __name)
                self.paused = True   # what the method itself dispatches is part of this one event
                try:
                    return __original(t, *a, **kw)
                finally:
                    self.paused = False
            setattr(torch.Tensor, name, wrapper)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    @property
    def total(self) -> int:
        return len(self.events)

    def count(self, where: str | None = None, kinds=None) -> int:
        """Events whose call site starts with `where` (e.g. 'model/moe/'), of `kinds` (default all)."""
        return sum(1 for k, _, s in self.events
                   if (where is None or s.startswith(where)) and (kinds is None or k in kinds))

    def by_kind(self) -> dict:
        return dict(collections.Counter(k for k, _, _ in self.events))

    def by_site(self) -> dict:
        """{'kind op @ site': count}, most frequent first."""
        c = collections.Counter(f"{k} {op} @ {s}" for k, op, s in self.events)
        return dict(c.most_common())


# ---- benchmarks/RESULTS.md's table: one training step per router, and the sampler's step ------------------
def tiny_config(router: str, schedule: str = "static", capacity_factor=None, sync_free: bool = False, **moe):
    """A 2-layer model small enough to count on the CPU in a second; syncs do not depend on size."""
    from model import ModelConfig, from_dict
    moe_cfg = {"router": router, "num_experts": 16, "expert_hidden": 32, "k": 4, "num_shared_experts": 1,
               "capacity_factor": capacity_factor, **moe}
    if schedule != "static":
        moe_cfg["capacity"] = {"schedule": schedule, "k_min": 2, "k_max": 6}
    return from_dict(ModelConfig, {"model": {"vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 4,
                                             "max_seq_len": 64}, "moe": moe_cfg,
                                   "diffusion": {"sync_free": sync_free}})


CONFIGS = {
    "ec_static": lambda: tiny_config("expert_choice"),
    "ec_static_sync_free": lambda: tiny_config("expert_choice", sync_free=True),
    "ec_linear_reverse": lambda: tiny_config("expert_choice", "linear_reverse"),
    "tc_cf1": lambda: tiny_config("token_choice", capacity_factor=1.0),
    "tc_dropless": lambda: tiny_config("token_choice"),
    "tc_dropless_bias": lambda: tiny_config("token_choice", bias_update_rate=1e-3),
}


def loss_of(result) -> torch.Tensor:
    """forward_loss's total loss: a TrainingForward now, a (loss, record, output) tuple before."""
    return result.loss if hasattr(result, "loss") else result[0]


def training_step_syncs(cfg, batch: int = 2, seq: int = 64, seed: int = 0, optimizer: bool = False) -> HostSyncCounter:
    """Counts one forward_loss + backward, and with `optimizer` the optimizer step too: the
    trainer's torch.optim.AdamW(fused=True) (trainer/engine/build.py) and zero_grad. Single
    process; DeepSpeed's own bookkeeping around the step (overflow check, gradient norm for
    clipping) is outside this count."""
    from model import DiffusionTransformer, forward_loss
    from model.diffusion import uniform_u
    torch.manual_seed(seed)
    model = DiffusionTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True) if optimizer else None
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, cfg.model.vocab_size, (batch, seq), generator=g)
    u, token_u = uniform_u(batch, g), torch.rand(batch, seq, generator=g)

    def step():
        loss_of(forward_loss(model, tokens, u, token_u)).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    step()   # warm-up: lazy one-time work (and the optimizer's state) stays out
    with HostSyncCounter() as sc:
        step()
    return sc


def sampler_step_syncs(cfg, steps: int = 4, seed: int = 0) -> tuple[HostSyncCounter, int]:
    """Counts evaluation.sample.generate over `steps` denoising steps; returns (counter, forwards)."""
    from evaluation.sample import SampleConfig, generate
    from model import DiffusionTransformer
    torch.manual_seed(seed)
    model = DiffusionTransformer(cfg).eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    sc_cfg = SampleConfig(gen_length=16, steps=steps)
    generate(model, prompts, sc_cfg)
    with HostSyncCounter() as sc:
        gen = generate(model, prompts, sc_cfg)
    return sc, gen.forward_passes


def one_rank_group():
    """A one-process gloo group (started once): enough to run the expert-parallel code path."""
    import torch.distributed as dist

    from benchmarks.common import free_port
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    return dist.group.WORLD


def expert_parallel_layer_syncs(layer, x_BLD: torch.Tensor, r_B=None) -> HostSyncCounter:
    """Counts one forward+backward of a copy of `layer` dispatching through AllToAllDispatcher
    (one-rank group): the expert-parallel code path, whose syncs do not depend on the rank count
    (each split size is read back once, however many ranks there are)."""
    import copy

    from model.moe.dispatch import AllToAllDispatcher
    layer = copy.deepcopy(layer)
    layer.dispatcher = AllToAllDispatcher(one_rank_group(), layer.cfg.num_experts)
    x = x_BLD.detach().clone().requires_grad_()
    layer(x, r_B).hidden.sum().backward()   # warm-up
    with HostSyncCounter() as sc:
        layer(x, r_B).hidden.sum().backward()
    return sc


def summarize(name: str, sc: HostSyncCounter, moe_layers: int, steps: int = 1) -> dict:
    in_layers = sc.count("model/moe/")
    return {"config": name, "per_step": sc.total / steps, "in_moe_layers": in_layers / steps,
            "per_moe_layer": in_layers / steps / max(moe_layers, 1),
            "outside_layers": (sc.total - in_layers) / steps, "by_kind": sc.by_kind(), "sites": sc.by_site()}


def count_all() -> list[dict]:
    rows = []
    for name, make in CONFIGS.items():
        cfg = make()
        rows.append(summarize(f"train/{name}", training_step_syncs(cfg), cfg.model.n_layers))
    cfg = CONFIGS["ec_static_sync_free"]()   # the whole step: forward, loss, backward, AdamW step
    rows.append(summarize("train+adamw/ec_static_sync_free", training_step_syncs(cfg, optimizer=True),
                          cfg.model.n_layers))
    for name in ("ec_static", "ec_linear_reverse", "tc_dropless"):
        cfg = CONFIGS[name]()
        sc, forwards = sampler_step_syncs(cfg)
        rows.append(summarize(f"sample/{name}", sc, cfg.model.n_layers, steps=forwards))
    from model.moe.layer import MoELayer
    for name in ("ec_static", "ec_linear_reverse", "tc_cf1", "tc_dropless"):   # one layer, fwd + bwd
        cfg = CONFIGS[name]()
        torch.manual_seed(0)
        sc = expert_parallel_layer_syncs(MoELayer(cfg.model.d_model, cfg.moe), torch.randn(2, 64, cfg.model.d_model),
                                         torch.rand(2))
        rows.append(summarize(f"expert_parallel_layer/{name}", sc, 1))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the rows (with every call site) here")
    p.add_argument("--sites", action="store_true", help="also print where each sync comes from")
    args = p.parse_args(argv)
    from benchmarks.common import format_table, machine_info, machine_line, write_json
    meta = machine_info(torch.device("cpu"), torch.float32)
    print(machine_line(meta))
    rows = count_all()
    print("host syncs per training step (forward_loss + backward) and per sampler step, 2-layer models")
    print(format_table(rows, [("config", "config", "s"), ("per_step", "per step", ".0f"),
                              ("in_moe_layers", "in MoE layers", ".0f"), ("per_moe_layer", "per MoE layer", ".1f"),
                              ("outside_layers", "outside", ".0f")]))
    if args.sites:
        for r in rows:
            print(f"\n{r['config']}:")
            for site, n in r["sites"].items():
                print(f"  {n:3d}  {site}")
    if args.json:
        write_json(args.json, meta, rows)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
