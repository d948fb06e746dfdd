"""Fixtures shared by every test: real servers, a backend per parameter, clients.

Tests that take the ``backend`` fixture (or ``client``/``connect``) run once per backend:
memory, redis and etcd. ``real_backend`` runs on redis and etcd only (for tests with real
processes or server faults). Servers come from tests/servers.py.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dcoord
from tests.servers import Server, ServerUnavailable, provider, start_server

BACKENDS = ("memory", "redis", "etcd")
REAL_BACKENDS = ("redis", "etcd")


class Servers:
    """The session's shared servers, started on first use and stopped at the end."""

    def __init__(self) -> None:
        self._urls: dict[str, str] = {}
        self._started: list[Server] = []

    def url(self, kind: str) -> str:
        if kind not in self._urls:
            external = os.environ.get(f"DCOORD_TEST_{kind.upper()}_URL")
            if external:
                self._urls[kind] = external
            else:
                server = _start_or_fail(kind)
                self._started.append(server)
                self._urls[kind] = server.url
        return self._urls[kind]

    def stop(self) -> None:
        for server in self._started:
            server.stop()


def _start_or_fail(kind: str, **options: Any) -> Server:
    try:
        return start_server(kind, **options)
    except ServerUnavailable as exc:
        pytest.fail(f"cannot start a real {kind} server for the tests: {exc}", pytrace=False)


def pytest_report_header(config: pytest.Config) -> str:
    try:
        chosen = provider()
    except ServerUnavailable as exc:
        chosen = f"error: {exc}"
    external = [k for k in REAL_BACKENDS if os.environ.get(f"DCOORD_TEST_{k.upper()}_URL")]
    return f"dcoord test servers: {chosen}" + (
        f" (external: {', '.join(external)})" if external else ""
    )


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    registry = Servers()
    yield registry
    registry.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend kind under test: memory, redis, etcd."""
    return str(request.param)


@pytest.fixture(params=REAL_BACKENDS)
def real_backend(request: pytest.FixtureRequest) -> str:
    """A server backend kind: redis, etcd."""
    return str(request.param)


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses, so tests sharing a server never see each other."""
    return f"t{uuid.uuid4().hex[:12]}"


def _url_for(kind: str, servers: Servers) -> str:
    # A memory store of its own per test: like a fresh server.
    return f"memory://t-{uuid.uuid4().hex[:12]}" if kind == "memory" else servers.url(kind)


@pytest.fixture
def backend_url(backend: str, servers: Servers) -> str:
    return _url_for(backend, servers)


@pytest.fixture
def real_backend_url(real_backend: str, servers: Servers) -> str:
    return _url_for(real_backend, servers)


@pytest.fixture
def connect(backend_url: str, namespace: str) -> Iterator[Callable[..., dcoord.Client]]:
    """``connect(**options)``: a client of the backend under test, closed after the test."""
    clients: list[dcoord.Client] = []

    def make(**options: Any) -> dcoord.Client:
        options.setdefault("namespace", namespace)
        client = dcoord.connect(backend_url, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(connect: Callable[..., dcoord.Client]) -> dcoord.Client:
    return connect()


@pytest.fixture
def server_factory() -> Iterator[Callable[..., Server]]:
    """``server_factory(kind, persistent=True)``: a dedicated server the test may pause,
    kill or restart; stopped after the test."""
    started: list[Server] = []

    def make(kind: str, *, persistent: bool = True) -> Server:
        server = _start_or_fail(kind, persistent=persistent)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
