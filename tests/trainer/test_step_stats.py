"""Step statistics (trainer/step_stats.py) reduced across 2 real gloo ranks equal the statistics of
the same global batch on 1 rank.

Every rank builds the same tiny EC model (seeded weights) and runs model.diffusion.forward_loss on
its half of each global batch, over two optimizer steps; the reference runs the whole global batch
in one process without a process group. Expert choice with per-sequence capacity (the tiny preset's
routing) keeps every logged statistic a sum or an equal-weight mean over sequences, so halves and
whole agree up to float rounding. (Token choice's balance loss is a product of batch means: its
per-micro-batch mean is not a property of the global batch, so it is left out here.)
"""
import pytest
import torch

from model import DiffusionTransformer
from model.config import CapacityConfig, ModelArchConfig, ModelConfig, MoEConfig
from model.diffusion import forward_loss
from tests.distributed import run_distributed
from trainer.step_stats import NUM_BINS, StepStats

B, L, STEPS = 8, 16, 2   # global batch of 8 sequences: 4 per rank


def config() -> ModelConfig:
    return ModelConfig(model=ModelArchConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=L),
                       moe=MoEConfig(num_experts=4, expert_hidden=8, k=2, num_shared_experts=1,
                                     capacity=CapacityConfig(schedule="linear_reverse", k_min=1, k_max=3)))


def global_batch(step: int):
    """Tokens and noise of one global batch; u spread over [0, 1) so several mask-ratio bins fill."""
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(4, 64, (B, L), generator=g)
    u = (torch.arange(B, dtype=torch.float64) + torch.rand(B, generator=g, dtype=torch.float64)) / B
    return tokens, u, torch.rand(B, L, generator=g, dtype=torch.float64)


def window(rows: slice, step_seconds: float):
    """StepStats of STEPS optimizer steps over the rows `rows` of each global batch, reduced."""
    torch.manual_seed(0)
    model = DiffusionTransformer(config(), seed=0)
    stats = StepStats(len(model.moe_layers()), model.cfg.moe.num_experts)
    for step in range(STEPS):
        tokens, u, token_u = global_batch(step)
        with torch.no_grad():
            stats.add_micro(forward_loss(model, tokens[rows], u[rows], token_u[rows]))
        stats.add_step(step_seconds, wait_seconds=0.25 * step_seconds, grad_norm=1.0 + step)
    return stats.reduce(torch.device("cpu"))


def _rank(rank: int, world: int):
    half = B // world
    # rank 0 "takes" 1 s a step and rank 1 3 s: fixed numbers, to check the time reduction's arithmetic
    return window(slice(rank * half, (rank + 1) * half), step_seconds=1.0 + 2.0 * rank)


@pytest.fixture(scope="module")
def reduced():
    return run_distributed(_rank, 2), window(slice(0, B), step_seconds=2.0)


def test_two_ranks_agree(reduced):
    ranks, _ = reduced
    a, b = ranks
    for name in ("loss", "z_loss", "mean_k", "masked_per_step", "assignments_per_step", "drop", "bin_loss",
                 "step_s", "rank_spread_s"):
        assert getattr(a, name) == getattr(b, name), name
    assert torch.equal(a.load, b.load)


def test_reduced_statistics_equal_one_rank_on_the_global_batch(reduced):
    (two, _), one = reduced
    assert two.loss == pytest.approx(one.loss, rel=1e-6)
    assert two.z_loss == pytest.approx(one.z_loss, rel=1e-5)
    assert two.aux_loss == one.aux_loss == 0.0   # expert choice has no balance loss
    assert two.mean_k == pytest.approx(one.mean_k, rel=1e-12)
    assert two.masked_per_step == one.masked_per_step
    assert two.assignments_per_step == one.assignments_per_step
    assert two.drop == pytest.approx(one.drop, rel=1e-12, abs=1e-12)
    assert torch.equal(two.load, one.load)
    assert len(two.bin_loss) == NUM_BINS
    assert [v is None for v in two.bin_loss] == [v is None for v in one.bin_loss]
    assert sum(v is not None for v in one.bin_loss) >= 4   # the comparison covers several bins
    for got, want in zip(two.bin_loss, one.bin_loss):
        if want is not None:
            assert got == pytest.approx(want, rel=1e-6)


def test_dynamic_capacity_moved_the_counts(reduced):
    """The comparison means something: linear_reverse gave sequences different k, so the counts
    are not the static T k, and they are exactly sums over both halves."""
    (two, _), one = reduced
    n_moe, tokens_per_step = 2, B * L
    assert one.assignments_per_step != n_moe * tokens_per_step * 2
    assert one.assignments_per_step == pytest.approx(one.mean_k * n_moe * tokens_per_step, rel=1e-12)
    # EC load: every expert holds exactly the capacity, summed over micro-batches and ranks
    assert one.load.shape == (n_moe, 4) and bool((one.load == one.load[:, :1]).all())


def test_step_times_are_mean_and_spread_over_ranks(reduced):
    (two, _), _ = reduced
    assert two.step_s == pytest.approx((1.0 + 3.0) / 2)
    assert two.rank_spread_s == pytest.approx(3.0 - 1.0)
    assert two.wait_frac == pytest.approx(0.25)
    assert two.grad_norm == pytest.approx((1.0 + 2.0) / 2)
