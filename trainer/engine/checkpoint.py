"""The engine's side of checkpoints: layout-free, pickle-free, complete before marked usable.

    step_00000100/
        tensors/rankRRRRR.safetensors   fragments of full tensors this rank owned (rundir/checkpoint_store.py):
        tensors/rankRRRRR.json            weights (non-expert ones by rank 0, each expert-parallel rank's
                                          experts by its expert-data-parallel rank 0), and this rank's
                                          ZeRO partition of the fp32 master weights (only when they differ
                                          from the weights, i.e. bf16) and of both Adam moments
        rng/rankRRRRR.safetensors       the rank's torch RNG state (a tensor)
        state.json                      step, tokens, data position, Adam step, LR schedule, engine
                                        counters, the model config and the layout that wrote it
        COMPLETE                        manifest of every file's size and sha256, written last

Nothing here is DeepSpeed's own checkpoint: the engine's `save_checkpoint` would write pickles
that tie the run to its world size, expert-parallel size and ZeRO stage. Instead the ZeRO-1/2
optimizer's flat fp32 partitions are mapped to ranges of each parameter (read from DeepSpeed
0.19's stage_1_and_2.py: every param is a view into its group's flat buffer, and rank r of the
group's data-parallel process group owns partition r of that buffer; expert groups are
partitioned over the expert-data-parallel group). Loading maps the other way, for any layout.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from rundir.checkpoint_store import (EXP_AVG, EXP_AVG_SQ, MASTER, WEIGHTS, FragmentReader, FragmentWriter,
                                     write_json, write_safetensors)
from rundir.checkpoint_store import atomic_file
from rundir.checkpoints import (STATE, CheckpointError, prune, read_manifest, read_state, tag_for, write_latest,
                                 write_manifest)
from trainer.distributed import comm_device

log = logging.getLogger("ecdlm")
CONSOLIDATE_SCRIPT = "zero_to_fp32.py"
EXIT_SAVE_FAILED = 89   # a save failed or was refused: retrying the same job will not help


class CheckpointSaveError(RuntimeError):
    """A save that failed (disk full, I/O error): its partial directory was removed."""


class NonFiniteWeightsError(RuntimeError):
    """The weights are not finite: no checkpoint is written from them."""


@dataclass
class Layout:
    """How this run is laid out over its processes: what a checkpoint records and may change."""
    world_size: int
    ep_size: int
    zero_stage: int
    micro_batch_size: int
    rank: int = 0
    ep_rank: int = 0
    expert_dp_rank: int = 0

    def public(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in ("world_size", "ep_size", "zero_stage",
                                                                 "micro_batch_size")}


# ---- where each parameter's elements live --------------------------------------------------------
@dataclass
class OwnedSlice:
    """Elements [start, end) of full tensor `name` (flattened) are at master[lo:hi] on this rank."""
    name: str
    group: int
    start: int
    end: int
    lo: int
    hi: int


def _is_expert(name: str) -> bool:
    return ".experts." in name


def param_names(engine) -> dict:
    """id(param) -> the model's parameter name (the engine wraps the model as `.model`)."""
    return {id(p): n[len("model."):] for n, p in engine.module.named_parameters() if n.startswith("model.")}


def full_base(name: str, p: torch.Tensor, layout: Layout) -> tuple:
    """(full shape, flat offset of this rank's local tensor in the full one). Experts are split by
    rows over the expert-parallel ranks; everything else is whole on every rank."""
    if _is_expert(name) and layout.ep_size > 1:
        return [p.shape[0] * layout.ep_size, *p.shape[1:]], layout.ep_rank * p.numel()
    return list(p.shape), 0


def owned_slices(engine, layout: Layout) -> list:
    """This rank's share of the ZeRO-1/2 master partitions, as ranges of full tensors."""
    zo, names = engine.optimizer, param_names(engine)
    if not hasattr(zo, "single_partition_of_fp32_groups"):
        raise CheckpointError("checkpoints need ZeRO stage 1 or 2 (zero_optimization.stage in the DeepSpeed JSON)")
    out = []
    for i, params in enumerate(zo.bit16_groups):
        flat = zo.bit16_groups_flat[i]
        part = zo.parallel_partitioned_bit16_groups[i][dist.get_rank(group=zo.real_dp_process_group[i])]
        esize = flat.element_size()
        ps = (part.data_ptr() - flat.data_ptr()) // esize
        pe = ps + part.numel()
        for p in params:
            off = (p.data_ptr() - flat.data_ptr()) // esize
            lo, hi = max(off, ps), min(off + p.numel(), pe)
            if lo >= hi:
                continue
            name = names[id(p)]
            _, base = full_base(name, p, layout)
            out.append(OwnedSlice(name, i, base + lo - off, base + hi - off, lo - ps, hi - ps))
    return out


def _optimizer_state(engine, group: int) -> dict:
    zo = engine.optimizer
    return zo.optimizer.state[zo.single_partition_of_fp32_groups[group]]


def _adam_step(engine) -> int:
    for i in range(len(engine.optimizer.bit16_groups)):
        st = _optimizer_state(engine, i)
        if "step" in st:
            return int(st["step"])
    return 0


# ---- save -------------------------------------------------------------------------------------------
def _all_true(flag: bool) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _weights_finite(engine) -> bool:
    """A sum is NaN or inf when any element is (inf - inf is NaN). One vectorized pass with no
    temporary the size of the weights: isfinite() allocates several and runs 20x slower on a CPU.
    It can only err towards "not finite", for weights so large (|w| ~ 1e30) that they diverged."""
    zo = engine.optimizer
    return all(bool(torch.isfinite(t.sum())) for t in (*zo.bit16_groups_flat, *zo.single_partition_of_fp32_groups))


def _write_rank_files(engine, model, path: str, layout: Layout) -> dict:
    """This rank's fragments and RNG state; returns {path: {"size", "sha256"}} of what it wrote."""
    zo, names = engine.optimizer, param_names(engine)
    w = FragmentWriter(path, layout.rank)
    for i, params in enumerate(zo.bit16_groups):
        for p in params:
            name = names[id(p)]
            writes = layout.expert_dp_rank == 0 if _is_expert(name) else layout.rank == 0
            if writes:
                shape, base = full_base(name, p, layout)
                w.add(name, WEIGHTS, shape, base, p.data)
    if layout.rank == 0:   # persistent buffers (the TC expert biases) are the same on every rank
        params = {n for n, _ in model.named_parameters()}
        for name, buf in model.state_dict().items():
            if name not in params:
                w.add(name, WEIGHTS, list(buf.shape), 0, buf)
    shapes = {names[id(p)]: full_base(names[id(p)], p, layout)[0] for ps in zo.bit16_groups for p in ps}
    keep_master = any(p.dtype != torch.float32 for ps in zo.bit16_groups for p in ps)
    for sl in owned_slices(engine, layout):
        master = zo.single_partition_of_fp32_groups[sl.group]
        if keep_master:
            w.add(sl.name, MASTER, shapes[sl.name], sl.start, master[sl.lo:sl.hi])
        st = _optimizer_state(engine, sl.group)
        for kind in (EXP_AVG, EXP_AVG_SQ):
            if kind in st:
                w.add(sl.name, kind, shapes[sl.name], sl.start, st[kind][sl.lo:sl.hi])
    files = w.write()
    rng = os.path.join(path, "rng", f"rank{layout.rank:05d}.safetensors")
    os.makedirs(os.path.dirname(rng), exist_ok=True)
    rng_state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng_state["cuda"] = torch.cuda.get_rng_state()
    files[rng] = write_safetensors(rng, rng_state)
    return files


def save_checkpoint(engine, model, run_dir: str, step: int, state: dict, *, layout: Layout, keep_last: int,
                    scheduler, healthy: bool = True, abandoned=()) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory. Raises
    NonFiniteWeightsError (nothing written) or CheckpointSaveError (partial directory removed,
    older checkpoints untouched). `abandoned`: checkpoints the resume skipped, which pruning
    neither counts nor removes."""
    root = os.path.join(run_dir, "checkpoints")
    path = os.path.join(root, tag_for(step))
    if not _all_true(_weights_finite(engine)):
        raise NonFiniteWeightsError(f"step {step}: the weights hold NaN or inf; no checkpoint written "
                                    f"(the newest healthy one is kept)")
    if layout.rank == 0 and os.path.isdir(path):   # a stale, incomplete attempt at the same step
        shutil.rmtree(path)
    dist.barrier()
    digests, error = {}, None
    try:
        for f, digest in _write_rank_files(engine, model, path, layout).items():
            digests[os.path.relpath(f, path)] = digest
    except OSError as err:
        error = err
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, (digests, None if error is None else str(error)))
    failed = [e for _, e in every if e]
    if layout.rank == 0 and not failed:
        try:
            record = {**state, "adam_step": _adam_step(engine), "scheduler": _scheduler_state(scheduler),
                      "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                                 "skipped_steps": engine.skipped_steps},
                      "layout": layout.public(), "model_config": asdict(model.cfg)}
            files = {k: v for d, _ in every for k, v in d.items()}
            files[STATE] = write_json(os.path.join(path, STATE), record)
            write_manifest(path, step, files, healthy)
            write_consolidation_script(root)
        except OSError as err:
            failed.append(str(err))
    failed = _broadcast_errors(failed)
    if failed:
        if layout.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()
        raise CheckpointSaveError(f"saving checkpoint {path} failed: {failed[0]}; "
                                  f"{_free_space(root)} free there; older checkpoints are untouched")
    if layout.rank == 0:
        write_latest(root, step)
        prune(root, keep_last, current=path, exclude=[a for a in abandoned if os.path.basename(a) != tag_for(step)])
    dist.barrier()
    return path


def _broadcast_errors(errors: list) -> list:
    box = [errors]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _free_space(path: str) -> str:
    try:
        st = os.statvfs(path)
        return f"{st.f_bavail * st.f_frsize / 2 ** 30:.2f} GiB"
    except OSError:
        return "unknown"


def _scheduler_state(scheduler) -> dict:
    """LambdaLR's counters (its lambda is rebuilt from the config, not saved)."""
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def write_consolidation_script(root: str) -> None:
    """checkpoints/zero_to_fp32.py: the layout-free store, runnable on its own (torch + safetensors)."""
    import rundir.checkpoint_store as store
    with open(store.__file__, "rb") as src, atomic_file(os.path.join(root, CONSOLIDATE_SCRIPT)) as dst:
        shutil.copyfileobj(src, dst)


# ---- load -------------------------------------------------------------------------------------------
def _init_optimizer_state(engine, group: int, step: int) -> dict:
    """Adam's state for a fresh engine's master partition (it is created lazily at the first step)."""
    zo = engine.optimizer
    master = zo.single_partition_of_fp32_groups[group]
    st = zo.optimizer.state[master]
    if not st:
        cpu_adam = type(zo.optimizer).__name__ == "DeepSpeedCPUAdam"
        st["step"] = step if cpu_adam else torch.tensor(float(step), dtype=torch.float32, device=master.device)
        st["exp_avg"] = torch.zeros_like(master)
        st["exp_avg_sq"] = torch.zeros_like(master)
    return st


def load_checkpoint(engine, model, path: str, *, layout: Layout, scheduler) -> dict:
    """Restores weights, fp32 master weights, Adam moments and step, LR schedule, engine counters
    and RNG from a checkpoint of any layout; returns its state.json record. Collective-free: every
    rank reads the ranges it needs. A file that is not what its name says (safetensors that do not
    parse, a missing fragment) is a CheckpointError naming it: nothing is ever unpickled."""
    try:
        return _load(engine, model, path, layout, scheduler)
    except CheckpointError:
        raise
    except Exception as err:   # safetensors' own error type is not importable by a stable name
        if isinstance(err, (KeyboardInterrupt, MemoryError)):
            raise
        raise CheckpointError(f"{path}: cannot be loaded: {type(err).__name__}: {err}") from None


@torch.no_grad()
def _load(engine, model, path: str, layout: Layout, scheduler) -> dict:
    read_manifest(path)   # verified by find_checkpoint; the structure is checked again as it is read
    state = read_state(path)
    reader = FragmentReader(path)
    zo, names = engine.optimizer, param_names(engine)
    for ps in zo.bit16_groups:
        for p in ps:
            name = names[id(p)]
            shape, base = full_base(name, p, layout)
            if reader.shape(name) != shape:
                raise CheckpointError(f"{path}: tensor {name} has shape {reader.shape(name)} there, "
                                      f"{shape} in this model")
            p.data.copy_(reader.flat_range(name, WEIGHTS, base, base + p.numel()).view_as(p))
    params = {n for n, _ in model.named_parameters()}
    for name, buf in model.state_dict().items():
        if name not in params and reader.has(name, WEIGHTS):
            buf.copy_(reader.full(name, WEIGHTS))
    for sl in owned_slices(engine, layout):
        master = zo.single_partition_of_fp32_groups[sl.group]
        src = MASTER if reader.has(sl.name, MASTER) else WEIGHTS
        master[sl.lo:sl.hi] = reader.flat_range(sl.name, src, sl.start, sl.end).to(master.dtype)
        st = _init_optimizer_state(engine, sl.group, state["adam_step"])
        for kind in (EXP_AVG, EXP_AVG_SQ):
            if reader.has(sl.name, kind):
                st[kind][sl.lo:sl.hi] = reader.flat_range(sl.name, kind, sl.start, sl.end).to(st[kind].dtype)
    for i in range(len(zo.bit16_groups)):   # a partition holding no parameter still needs a state
        _init_optimizer_state(engine, i, state["adam_step"])
    # its lambdas are closures rebuilt from the config: nothing of theirs to restore
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr   # the optimizer's lr follows the schedule's position, not its start
    counters = state["engine"]
    engine.global_steps, engine.global_samples = counters["global_steps"], counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]
    rng_path = os.path.join(path, "rng", f"rank{layout.rank:05d}.safetensors")
    if os.path.exists(rng_path):   # a rank the saving layout did not have keeps its own
        try:
            rng = load_file(rng_path)
        except Exception as err:   # noqa: BLE001 - see load_checkpoint
            raise CheckpointError(f"{rng_path}: not a safetensors file ({err}); refusing to read it") from None
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def layout_change(state: dict, layout: Layout) -> Optional[str]:
    """One line saying how the layout changed since the checkpoint, or None if it did not."""
    before, now = state.get("layout", {}), layout.public()
    if before == now:
        return None
    fmt = lambda d: ", ".join(f"{k} {d.get(k)}" for k in ("world_size", "ep_size", "zero_stage",   # noqa: E731
                                                          "micro_batch_size"))
    return f"resharding checkpoint: written at {fmt(before)}; continuing at {fmt(now)}"
