"""Session fixture: one throwaway two-node SLURM cluster for all tests in tests/slurm.

The cluster (tests/slurm/cluster.py) lives in a fresh /tmp directory and is stopped at the
end of the session whatever happened (daemons stopped by PID). When the SLURM/munge
binaries are missing and cannot be installed, or we are not root, every test here is
SKIPPED with the exact reason; a cluster that should start but does not is an ERROR with
the daemon logs.

Set ECDLM_SLURM_KEEP=1 to keep the state directory (configs, daemon logs) afterwards.
"""
from __future__ import annotations

import os
import shutil

import pytest

from .cluster import ClusterUnavailable, SlurmCluster, ensure_binaries


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip(f"SLURM tests need root: the throwaway cluster runs slurmd/slurmctld as "
                    f"SlurmUser=root (this process runs as uid {os.geteuid()})")
    try:
        ensure_binaries()
    except ClusterUnavailable as e:
        pytest.skip(f"SLURM tests skipped: {e}")
    cluster = SlurmCluster()
    try:
        cluster.start()
    except ClusterUnavailable as e:
        pytest.skip(f"SLURM tests skipped: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("ECDLM_SLURM_KEEP") == "1":
            print(f"\nkept SLURM test cluster state in {cluster.root}")
        else:
            shutil.rmtree(cluster.root, ignore_errors=True)
