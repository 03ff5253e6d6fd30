"""Each rank's intra-op threads: the host's cores shared among the ranks on it (trainer/engine/cpu_threads.py)."""
import os

import pytest
import torch

from tests.distributed import run_distributed
from trainer.engine import cpu_threads


@pytest.mark.parametrize("cores,ranks,want", [(2, 2, 1), (2, 1, 2), (16, 8, 2), (4, 8, 1), (96, 8, 12)])
def test_threads_are_cores_over_local_ranks(cores, ranks, want):
    assert cpu_threads.threads_per_rank(cores, ranks) == want


@pytest.mark.parametrize("var", cpu_threads.LOCAL_SIZE_VARS)
def test_a_launchers_local_size_is_read(monkeypatch, var):
    for name in cpu_threads.LOCAL_SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(var, "3")
    assert cpu_threads.ranks_on_this_host() == 3


def test_omp_num_threads_set_by_the_user_is_kept(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert cpu_threads.share_cpu_threads() is None
    assert torch.get_num_threads() == before


def _share(rank, world):
    for name in (*cpu_threads.LOCAL_SIZE_VARS, "OMP_NUM_THREADS"):
        os.environ.pop(name, None)
    line = cpu_threads.share_cpu_threads()
    return cpu_threads.ranks_on_this_host(), torch.get_num_threads(), line


def test_without_a_launcher_variable_the_ranks_on_a_host_are_counted_over_the_group():
    """Plain env:// ranks (srun, mpirun): no LOCAL_* variable, so the host names are gathered."""
    out = run_distributed(_share, 2)
    cores = cpu_threads.usable_cores()
    for local, threads, line in out:
        assert local == 2
        assert threads == max(1, cores // 2)
        assert line.startswith(f"CPU threads per rank: {max(1, cores // 2)} ({cores} cores shared by 2 ranks")
