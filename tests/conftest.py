"""Fixtures shared by every test: real servers, a backend per parameter, clients.

Tests that take the ``backend`` fixture (or ``client``/``connect``) run once per backend:
memory, redis and etcd. ``real_backend`` runs on redis and etcd only (for tests with real
processes or server faults). Servers come from tests/servers.py.

``DCOORD_TEST_SECURE=1`` runs the shared servers (and those of ``server_factory``) with TLS
(certificates generated for the session, client certificates required) and auth: their
URLs are ``rediss://`` / ``etcds://`` with the admin's credentials, and the ``connect``
fixture (hence ``client``) connects as a user confined to the test's namespace by exactly
what ``dcoord acl`` prints.

``DCOORD_TEST_TOPOLOGY=sentinel|cluster|etcd3`` makes the shared redis (sentinel,
cluster) or etcd (etcd3) server a multi-server topology from tests/topologies/, so every
test of the shared server runs against it unchanged. Tests that start their own servers
(``server_factory``) still get single servers.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import dcoord
from dcoord.backends import registry
from tests.servers import (
    Certificates,
    Server,
    ServerUnavailable,
    make_certificates,
    provider,
    start_server,
)

# Every registered driver; the server ones (tests/servers.py starts them) as real_backend.
BACKENDS = tuple(driver.kind for driver in registry.drivers())
REAL_BACKENDS = tuple(d.kind for d in registry.drivers() if d.capabilities.persistent)
# DCOORD_TEST_TOPOLOGY -> (the backend kind it replaces, module in tests/topologies, class)
TOPOLOGIES = {
    "sentinel": ("redis", "sentinel", "SentinelSet"),
    "cluster": ("redis", "cluster", "ClusterSet"),
    "etcd3": ("etcd", "etcd", "EtcdCluster"),
}
SECURE = os.environ.get("DCOORD_TEST_SECURE", "").strip() not in ("", "0")
# The admin password of secure test servers, and the password of each namespace's user.
ADMIN_PASSWORD = "admin-pw-do-not-print"
USER_PASSWORD = "user-pw-do-not-print"


class Servers:
    """The session's shared servers, started on first use and stopped at the end."""

    def __init__(self) -> None:
        self._urls: dict[str, str] = {}
        self._started: dict[str, Server] = {}
        self._certificates: Certificates | None = None

    def certificates(self) -> Certificates:
        """The session's test CA and certificates, generated on first use."""
        if self._certificates is None:
            directory = Path(tempfile.mkdtemp(prefix="dcoord-certs-"))
            try:
                self._certificates = make_certificates(directory)
            except ServerUnavailable as exc:
                pytest.fail(f"cannot make test certificates: {exc}", pytrace=False)
        return self._certificates

    def security(self) -> dict[str, Any]:
        """The ``start_server`` options of DCOORD_TEST_SECURE (none without it)."""
        return {"tls": self.certificates(), "password": ADMIN_PASSWORD} if SECURE else {}

    def url(self, kind: str) -> str:
        if kind not in self._urls:
            external = os.environ.get(f"DCOORD_TEST_{kind.upper()}_URL")
            chosen = topology()
            if chosen is not None and TOPOLOGIES[chosen][0] == kind:
                server: Any = _start_topology_or_fail(chosen, **self.security())
                self._started[kind] = server
                self._urls[kind] = server.url
            elif external and not SECURE:
                self._urls[kind] = external
            else:
                server = _start_or_fail(kind, **self.security())
                self._started[kind] = server
                self._urls[kind] = server.url
        return self._urls[kind]

    def confined_url(self, kind: str, namespace: str) -> str:
        """With DCOORD_TEST_SECURE, the URL of a user confined to ``namespace`` (created
        now); else the shared server's URL."""
        url = self.url(kind)
        if not SECURE:
            return url
        return self._started[kind].confine(namespace, f"u-{namespace}", USER_PASSWORD)

    def stop(self) -> None:
        for server in self._started.values():
            server.stop()
        if self._certificates is not None:
            shutil.rmtree(self._certificates.directory, ignore_errors=True)


def topology() -> str | None:
    """The DCOORD_TEST_TOPOLOGY asked for (None: single servers)."""
    chosen = os.environ.get("DCOORD_TEST_TOPOLOGY", "").strip().lower()
    if chosen in ("", "single"):
        return None
    if chosen not in TOPOLOGIES:
        known = ", ".join(["single", *TOPOLOGIES])
        raise pytest.UsageError(f"DCOORD_TEST_TOPOLOGY={chosen!r}: expected one of {known}")
    return chosen


def _start_topology_or_fail(name: str, **options: Any) -> Any:
    _, module, cls = TOPOLOGIES[name]
    started = getattr(importlib.import_module(f"tests.topologies.{module}"), cls)(**options)
    try:
        started.start()
    except ServerUnavailable as exc:
        started.stop()
        pytest.fail(f"cannot start a {name} topology for the tests: {exc}", pytrace=False)
    except BaseException:
        started.stop()
        raise
    return started


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
    return (
        f"dcoord test servers: {chosen}"
        + (f", topology {topology()}" if topology() else "")
        + (f" (external: {', '.join(external)})" if external and not SECURE else "")
        + (" with TLS and auth (DCOORD_TEST_SECURE)" if SECURE else "")
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
    driver = registry.driver(kind)
    if driver.embedded:
        # An in-process store of its own per test: like a fresh server.
        return f"{driver.schemes[0].name}://t-{uuid.uuid4().hex[:12]}"
    return servers.url(kind)


@pytest.fixture
def backend_url(backend: str, servers: Servers) -> str:
    return _url_for(backend, servers)


@pytest.fixture
def real_backend_url(real_backend: str, servers: Servers) -> str:
    return _url_for(real_backend, servers)


@pytest.fixture
def connect(
    backend: str, backend_url: str, namespace: str, servers: Servers
) -> Iterator[Callable[..., dcoord.Client]]:
    """``connect(**options)``: a client of the backend under test, closed after the test
    (with DCOORD_TEST_SECURE: as a user confined to the test's namespace)."""
    clients: list[dcoord.Client] = []
    url = backend_url if backend == "memory" else servers.confined_url(backend, namespace)

    def make(**options: Any) -> dcoord.Client:
        options.setdefault("namespace", namespace)
        client = dcoord.connect(url, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(connect: Callable[..., dcoord.Client]) -> dcoord.Client:
    return connect()


@pytest.fixture
def dcoord_connect() -> Callable[..., dcoord.Client]:
    """The connect function of tests that connect themselves (a URL, options; a client
    usable with ``with``): ``dcoord.connect`` here, the async API's in tests/aio."""
    return dcoord.connect


@pytest.fixture
def certificates(servers: Servers) -> Certificates:
    """The session's test CA and certificates (see tests/servers.py)."""
    return servers.certificates()


@pytest.fixture
def server_factory(servers: Servers) -> Iterator[Callable[..., Server]]:
    """``server_factory(kind, persistent=True, **options)``: a dedicated server the test
    may pause, kill or restart; stopped after the test. ``options`` are start_server's
    (``tls``, ``certificate``, ``password``); DCOORD_TEST_SECURE's are the default."""
    started: list[Server] = []

    def make(kind: str, *, persistent: bool = True, **options: Any) -> Server:
        options = {**servers.security(), **options}
        server = _start_or_fail(kind, persistent=persistent, **options)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
