"""Fixtures of the async API's tests: async clients of the backend under test.

``backend`` here covers the backends dcoord.aio supports (memory, redis, etcd); the root
conftest's servers, namespaces and URLs are reused as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.aio.adapter import Loop, SyncView
from tests.conftest import Servers, topology

AIO_BACKENDS = ("memory", "redis", "etcd")
# Async membership and 2PC refuse a Redis Cluster by name (ConfigError; see
# dcoord.backends.redis.aio_locks.refuse_cluster, tested in test_topologies.py): on
# DCOORD_TEST_TOPOLOGY=cluster their Redis cases are skipped, not failed.
NOT_ON_A_CLUSTER = (
    "test_membership",
    "test_membership_conformance",
    "test_twopc",
    "test_twopc_conformance",
    "test_twopc_replicas",
    "test_txlog_paging",
    "test_kvparticipant_conformance",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if topology() != "cluster":
        return
    skip = pytest.mark.skip(reason="dcoord.aio membership and 2PC refuse a Redis Cluster")
    for item in items:
        params = getattr(item, "callspec", None)
        kinds = [v for v in params.params.values() if isinstance(v, str)] if params else []
        package, _, module = item.module.__name__.rpartition(".")  # every item of the session
        if package == "tests.aio" and module in NOT_ON_A_CLUSTER and "redis" in kinds:
            item.add_marker(skip)


@pytest.fixture(params=AIO_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend kind under test with the async API: memory, redis, etcd."""
    return str(request.param)


@pytest.fixture(params=["redis", "etcd"])
def real_backend(request: pytest.FixtureRequest) -> str:
    """A server backend kind: redis, etcd."""
    return str(request.param)


@pytest.fixture
def aio_url(backend: str, backend_url: str, namespace: str, servers: Servers) -> str:
    """The URL an async client of the backend under test connects to."""
    return backend_url if backend == "memory" else servers.confined_url(backend, namespace)


@pytest.fixture
def loop() -> Iterator[Loop]:
    """An event loop on a thread of its own (for the adapter)."""
    running = Loop()
    yield running
    running.stop()


@pytest.fixture
def connect(aio_url: str, namespace: str, loop: Loop) -> Iterator[Callable[..., SyncView]]:
    """The conformance suite's ``connect``, made with the async API (tests/aio/adapter.py)."""
    clients: list[SyncView] = []

    def make(**options: Any) -> SyncView:
        options.setdefault("namespace", namespace)
        client = SyncView(loop, aio_url, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(connect: Callable[..., SyncView]) -> SyncView:
    return connect()
