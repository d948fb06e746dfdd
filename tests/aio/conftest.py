"""Fixtures of the async API's tests: async clients of the backend under test.

``backend`` here covers the backends dcoord.aio supports (memory, redis, etcd); the root
conftest's servers, namespaces and URLs are reused as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.aio.adapter import Loop, SyncView
from tests.conftest import Servers

AIO_BACKENDS = ("memory", "redis", "etcd")


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


@pytest.fixture
def dcoord_connect(loop: Loop) -> Iterator[Callable[..., SyncView]]:
    """The root conftest's ``dcoord_connect`` with the async API: ``dcoord.aio.connect``
    seen through the adapter; what a test leaves open is closed after it."""
    clients: list[SyncView] = []

    def make(url: Any = None, **options: Any) -> SyncView:
        client = SyncView(loop, url, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
