"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import pytest

from tests.helpers.slurm_cluster import SlurmCluster, SlurmUnavailable
from tests.helpers.slurm_two_nodes import TwoNodeSlurmCluster

ClusterT = TypeVar("ClusterT", bound=SlurmCluster)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A SLURM test is also a slow one: ``-m "not slow"`` (``make test-fast``) leaves it out."""
    for item in items:
        if item.get_closest_marker("slurm") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


def _running(cluster: ClusterT, what: str) -> Iterator[ClusterT]:
    """Start ``cluster``, skip (saying why) where SLURM cannot be provided, stop it by pid afterwards.

    An installed cluster that does not come up is a failure, not a skip.
    """
    try:
        cluster.start()
    except SlurmUnavailable as err:
        pytest.skip(f"no {what}: {err}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One real single-node SLURM cluster for the session (started on first use: ~1 s, ~20 s if it installs).

    Skips when SLURM cannot be provided (not root, no apt, install failed). The daemons are stopped by pid at
    session end, also after failures.
    """
    yield from _running(SlurmCluster(), "SLURM test cluster")


@pytest.fixture(scope="session")
def two_node_cluster() -> Iterator[TwoNodeSlurmCluster]:
    """A real two-node SLURM cluster for the session: nodes n1 and n2 in two network namespaces on this machine.

    Skips when SLURM cannot be provided or the namespaces cannot be made (the reason is in the skip message).
    Daemons, leftover processes and the namespaces (with their veth link) are removed at session end.
    """
    yield from _running(TwoNodeSlurmCluster(), "two-node SLURM test cluster")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The embedded real-image dataset (8 classes of 32 px photo crops), built once per session in a temp folder."""
    from dip_lightning.core.data.demo_dataset import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("demo_data"), size=32)


@pytest.fixture(scope="session")
def guide_checkpoints(tmp_path_factory: pytest.TempPathFactory, demo_data: dict) -> dict:
    """Autoguidance checkpoints (:func:`tests.helpers.guide.guided_runs`), trained once per session."""
    from tests.helpers.guide import guided_runs

    return guided_runs(tmp_path_factory.mktemp("guided_runs"), demo_data)
