"""graph: expert choice's static-capacity training step captured as one CUDA graph, against eager.

EC with a static schedule fixes every shape before the data arrives (each expert takes C = L k / E
tokens per sequence), so a whole step (forward, loss, backward, AdamW) can be recorded once with
`torch.cuda.graph` and replayed with no host work at all. That needs a step with no host sync:
the config is owt_ec with `moe.capacity.schedule: static` and, where this checkout has it,
`diffusion.sync_free: true` (without it the row says "sync_free option unavailable" and the
capture is tried anyway; it fails at the first sync, and the row says where).

    eager      the same model and capturable fused AdamW, stepped normally
    graph      copy the next batch's tokens and per-token noise into the captured inputs, replay;
               the noise levels u stay those captured (a graph's sizes are fixed at capture, and
               a sync-free step may size its masked rows from u)
    syncs      host syncs of one eager forward + backward, counted on any device
               (benchmarks/host_syncs.py) and, on CUDA, by torch.cuda.set_sync_debug_mode

TC dropless is recorded as not capturable: each expert's row count comes out of the routing, so
the grouped matmul's and the combine's sizes are data-dependent, and a graph fixes them at
capture. On the CPU (--cpu-smoke) nothing is captured; the eager timing and the sync counts run.
"""
from __future__ import annotations

import time

import torch

from benchmarks.gpu_setup import device_model, has_option, step_config, sync
from benchmarks.gpu_step import batches, cuda_sync_count, parts

TC_REASON = ("token-choice dropless: each expert's row count comes out of the routing, so the grouped "
             "matmul's and the combine's sizes are data-dependent; a CUDA graph fixes every size at capture")


def graph_step(model, opt, batch) -> torch.Tensor:
    """forward_loss, backward, optimizer step; no zero_grad: gradients are None at capture, so the
    captured backward writes them rather than adding to them."""
    from model import forward_loss
    loss = parts(forward_loss(model, *batch))[0]
    loss.backward()
    opt.step()
    return loss.detach()


def capture(model, opt, static: tuple, warmup: int = 3):
    """(graph, its loss output): warm-up on a side stream (the optimizer's state and the allocator's
    blocks exist before capture), then one step recorded."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            opt.zero_grad(set_to_none=True)
            graph_step(model, opt, static)
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss = graph_step(model, opt, static)
    return g, loss


def context_healthy(device) -> bool:
    try:
        return float(torch.ones(1, device=device).add_(1).sum()) == 2.0
    except Exception:
        return False


def ec_static_row(ctx, sink) -> dict:
    from benchmarks.gpu_guard import error_fields
    from benchmarks.host_syncs import HostSyncCounter
    from model import forward_loss
    device = ctx.device
    sync_free = has_option("diffusion", "sync_free")
    cfg, B, L = step_config("owt_ec", ctx.smoke, moe_overrides={"capacity": {"schedule": "static"}},
                            diffusion_overrides={"sync_free": True} if sync_free else None)
    model = device_model(cfg, device, ctx.dtype)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                            **({"fused": True, "capturable": True} if cuda else {}))
    data = batches(cfg, B, L, device)

    def eager(batch):
        opt.zero_grad(set_to_none=True)
        return graph_step(model, opt, batch)
    for i in range(ctx.step_warmup):
        eager(data[i % len(data)])
    times = []
    for i in range(ctx.step_repeat):
        sync(device)
        t0 = time.perf_counter()
        eager(data[i % len(data)])
        sync(device)
        times.append(time.perf_counter() - t0)
    eager_ms = sorted(times)[len(times) // 2] * 1e3
    row = sink.add({"config": "owt_ec static", "B": B, "L": L, "eager_ms": eager_ms,
                    "eager_times_ms": [t * 1e3 for t in times], "tokens_per_s_eager": B * L / eager_ms * 1e3,
                    "sync_free": True if sync_free else "sync_free option unavailable",
                    "optimizer": "AdamW fused, capturable" if cuda else "AdamW (foreach)"})
    try:
        with HostSyncCounter() as sc:
            opt.zero_grad(set_to_none=True)
            parts(forward_loss(model, *data[1]))[0].backward()
        row.update(counted_syncs=sc.total, sync_sites=sc.by_site())
        if cuda:
            row["cuda_syncs"] = cuda_sync_count(lambda: eager(data[2]))
    except Exception as err:
        row["syncs_error"] = error_fields(err)["error"]
    sink.save()
    if not cuda:
        row["graph"] = "not captured: CUDA graphs need a GPU (cpu-smoke)"
        sink.save()
        return row
    static = tuple(t.clone() for t in data[0])
    try:
        g, loss = capture(model, opt, static)
    except Exception as err:
        row.update(graph="capture failed", graph_error=error_fields(err)["error"],
                   context_healthy_after=context_healthy(device))
        sink.save()
        return row
    replay_times, losses = [], []
    for i in range(ctx.step_repeat + 1):
        tokens, _, token_u = data[i % len(data)]
        sync(device)
        t0 = time.perf_counter()
        static[0].copy_(tokens)
        static[2].copy_(token_u)
        g.replay()
        sync(device)
        replay_times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    replay_times = replay_times[1:]   # the first replay uploads the graph
    graph_ms = sorted(replay_times)[len(replay_times) // 2] * 1e3
    row.update(graph="captured", graph_ms=graph_ms, graph_times_ms=[t * 1e3 for t in replay_times],
               tokens_per_s_graph=B * L / graph_ms * 1e3, speedup=eager_ms / graph_ms, replay_losses=losses,
               replay_losses_finite=all(torch.isfinite(torch.tensor(losses)).tolist()))
    sink.save()
    del g
    return row


def tc_row(ctx) -> dict:
    steps = [r for r in (ctx.results.get("step") or []) if r.get("config") == "owt_tc"]
    syncs = steps[0].get("counted_syncs_per_step") if steps else None
    return {"config": "owt_tc dropless", "graph": "not capturable", "reason": TC_REASON,
            "counted_syncs": syncs}


def run(ctx, sink) -> None:
    from benchmarks.gpu_guard import clean_up, guarded
    sink.add(tc_row(ctx))   # first: it takes no time, and nothing after can cost it
    guarded(sink, {"config": "owt_ec static"}, lambda: ec_static_row(ctx, sink), ctx.device)
    clean_up(ctx.device)
