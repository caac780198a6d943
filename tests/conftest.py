"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.slurm_cluster import SlurmCluster, SlurmUnavailable


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One real single-node SLURM cluster for the session (started on first use: ~1 s, ~20 s if it installs).

    Skips when SLURM cannot be provided (not root, no apt, install failed); an installed cluster that does not
    come up is a failure, not a skip. The daemons are stopped by pid at session end, also after failures.
    """
    cluster = SlurmCluster()
    try:
        cluster.start()
    except SlurmUnavailable as err:
        pytest.skip(f"no SLURM test cluster: {err}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The embedded real-image dataset (8 classes of 32 px photo crops), built once per session in a temp folder."""
    from dip_lightning.data.demo import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("demo_data"), size=32)
