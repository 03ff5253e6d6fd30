"""diffusion.sync_free (the head and loss over every position, weighted by the mask) and
moe.router_precision."""
import math

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.host_syncs import tiny_config
from model import DiffusionTransformer, ModelConfig, forward_loss, from_dict
from model.config import ConfigError
from model.moe.layer import MoELayer
from model.moe.layer import router_logits


def _pair(**moe):
    """The same weights (init is seeded) with sync_free off and on."""
    return (DiffusionTransformer(tiny_config("expert_choice", sync_free=False, **moe), seed=3),
            DiffusionTransformer(tiny_config("expert_choice", sync_free=True, **moe), seed=3))


def test_sync_free_gives_the_same_loss_and_gradients():
    rows, dense = _pair()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 256, (3, 64), generator=g)
    u, token_u = torch.rand(3, generator=g, dtype=torch.float64), torch.rand(3, 64, generator=g)
    a, b = forward_loss(rows, tokens, u, token_u), forward_loss(dense, tokens, u, token_u)
    assert a.output.logits.shape[0] == int(a.diffusion.mask_BL.sum()) and b.output.logits.shape == (3, 64, 256)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(b.diffusion.nll_BL, a.diffusion.nll_BL, rtol=1e-5, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(rows.named_parameters(), dense.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_sync_free_elbo_is_an_unbiased_estimate_of_the_bernoulli_objective():
    """Monte Carlo on a tiny fixed model: the sync-free estimates over one set of noise draws and
    the masked-rows (Bernoulli) estimates over another, independent set have means within 3
    standard errors of each other (each estimate is itself unbiased for the ELBO)."""
    rows, dense = _pair()
    rows.eval(), dense.eval()
    tokens = torch.randint(4, 256, (2, 64), generator=torch.Generator().manual_seed(1))

    def draws(model, seed, n=80):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return torch.tensor([float(forward_loss(model, tokens, torch.rand(2, generator=g, dtype=torch.float64),
                                                    torch.rand(2, 64, generator=g)).diffusion.elbo)
                                 for _ in range(n)])
    a, b = draws(rows, 100), draws(dense, 200)
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert se > 0 and abs(float(a.mean() - b.mean())) < 3 * se, (float(a.mean()), float(b.mean()), se)


def test_router_precision_is_a_named_option():
    assert from_dict(ModelConfig, {}).moe.router_precision == "fp32"
    try:
        from_dict(ModelConfig, {"moe": {"router_precision": "fp16"}})
    except ConfigError as err:
        assert "moe.router_precision" in str(err) and "bf16" in str(err)
    else:
        raise AssertionError("fp16 accepted")


def test_fp32_router_is_unchanged_and_bf16_runs_the_matmul_in_bf16():
    torch.manual_seed(0)
    x, w = torch.randn(2, 16, 32), torch.randn(8, 32)
    assert torch.equal(router_logits(x, w, "fp32"), F.linear(x.float(), w.float()))
    assert torch.equal(router_logits(x, w, "tf32"), F.linear(x, w))   # no TF32 on a CPU
    bf = router_logits(x, w, "bf16")
    assert bf.dtype == torch.float32 and torch.equal(bf, F.linear(x.bfloat16(), w.bfloat16()).float())
    assert not torch.equal(bf, router_logits(x, w, "fp32"))

    class Matmuls(TorchDispatchMode):   # dtypes of every matmul whose output is [.., E = 8]
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._schema.name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear") \
                    and out.shape[-1] == 8:
                self.seen.append(out.dtype)
            return out
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg = from_dict(ModelConfig, {"moe": {"num_experts": 8, "expert_hidden": 16, "k": 2,
                                              "router_precision": precision}}).moe
        torch.manual_seed(0)
        layer = MoELayer(32, cfg)
        Matmuls.seen = []
        with Matmuls():
            out = layer(x)
        assert Matmuls.seen == [dtype], (precision, Matmuls.seen)
        if precision == "fp32":   # the layer's output as before the option existed
            torch.manual_seed(0)
            ref = MoELayer(32, cfg)
            logits = F.linear(x.float(), ref.router.weight.float())
            routing, _ = ref.route(logits, None, None)
            torch.testing.assert_close(out.hidden, ref.routed_experts(x.reshape(-1, 32), routing).view_as(x),
                                       rtol=0, atol=0)
