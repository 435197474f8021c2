"""The real Slurm cluster (support/slurm_cluster.py), started once per session for every test in this folder."""

from __future__ import annotations

import pytest

from support.slurm_cluster import SlurmCluster, ensure_slurm_installed


@pytest.fixture(scope="session")
def slurm_cluster():
    """A 2-node Slurm cluster shared by every SLURM test of the session."""
    ensure_slurm_installed()
    cluster = SlurmCluster(num_nodes=2)
    try:
        cluster.start()
    except Exception as e:
        logs = cluster.daemon_logs()
        cluster.stop()
        raise RuntimeError(f"could not start the test Slurm cluster: {e}\n{logs}") from e
    yield cluster
    cluster.stop()
