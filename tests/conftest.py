"""Fixtures shared by the test modules that need real storage-server processes."""

from collections.abc import Iterator

import pytest

from .storage_cluster import StorageCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageCluster]:
    """Five `blackmatch storage run` processes on loopback, one set per test module (some modules stop and
    restart servers)."""
    with StorageCluster(tmp_path_factory.mktemp("cluster"), 5) as running:
        yield running


@pytest.fixture
def all_running(cluster: StorageCluster) -> Iterator[StorageCluster]:
    """The cluster, with every server started again after the test, whatever it stopped."""
    yield cluster
    for index, process in enumerate(cluster.processes):
        if not process.running:
            cluster.restart(index)
