"""Connecting, pinging, namespaces and configuration errors: the same on every backend."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

import dcoord
from tests.servers import free_port


def test_ping_reports_kind_and_version(backend: str, client: dcoord.Client) -> None:
    info = client.ping()
    assert info.kind == backend
    major = info.version.split(".")[0]
    assert major.isdigit(), info.version
    if backend == "redis":
        assert int(major) >= 7
    if backend == "etcd":
        assert int(major) == 3


def test_namespaces_do_not_see_each_other(connect: Callable[..., dcoord.Client]) -> None:
    a = connect(namespace="app-a")
    b = connect(namespace="app-b")
    a.backend.kv.put("shared-name", b"from a")
    b.backend.kv.put("shared-name", b"from b")
    assert a.backend.kv.get("shared-name") == b"from a"
    assert b.backend.kv.get("shared-name") == b"from b"
    assert a.backend.kv.scan("") == {"shared-name": b"from a"}
    assert b.backend.kv.delete("shared-name")
    assert a.backend.kv.get("shared-name") == b"from a"
    assert b.backend.kv.get("shared-name") is None


def test_two_clients_of_one_namespace_share_keys(connect: Callable[..., dcoord.Client]) -> None:
    a, b = connect(), connect()
    a.backend.kv.put("k", b"v")
    assert b.backend.kv.get("k") == b"v"


def test_scan_treats_glob_characters_literally(client: dcoord.Client) -> None:
    client.backend.kv.put("a*b", b"1")
    client.backend.kv.put("axb", b"2")
    assert client.backend.kv.scan("a*") == {"a*b": b"1"}


def test_close_is_idempotent_and_context_manager_closes(
    backend_url: str, dcoord_connect: Callable[..., dcoord.Client]
) -> None:
    with dcoord_connect(backend_url) as client:
        client.ping()
    assert client.closed
    client.close()


@pytest.mark.parametrize("scheme", ["redis", "etcd"])
def test_unreachable_server_raises_backend_unavailable_within_timeout(
    scheme: str, dcoord_connect: Callable[..., dcoord.Client]
) -> None:
    url = f"{scheme}://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(dcoord.BackendUnavailable) as info:
        dcoord_connect(url, connect_timeout=1.5)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5 + 1.0, f"took {elapsed:.2f} s for a 1.5 s connect_timeout"
    assert info.value.__cause__ is not None
    assert "127.0.0.1" in str(info.value)


def test_default_is_embedded_backend(
    monkeypatch: pytest.MonkeyPatch, dcoord_connect: Callable[..., dcoord.Client]
) -> None:
    monkeypatch.delenv("DCOORD_URL", raising=False)
    with dcoord_connect() as client:
        assert client.ping().kind == "memory"


def test_dcoord_url_environment_variable_is_used(
    monkeypatch: pytest.MonkeyPatch,
    backend_url: str,
    backend: str,
    dcoord_connect: Callable[..., dcoord.Client],
) -> None:
    monkeypatch.setenv("DCOORD_URL", backend_url)
    with dcoord_connect(namespace="env") as client:
        assert client.ping().kind == backend
        assert client.namespace == "env"


def test_mapping_config(
    backend_url: str, backend: str, dcoord_connect: Callable[..., dcoord.Client]
) -> None:
    mapping = {"url": backend_url, "namespace": "mapped", "request_timeout": "2.5"}
    with dcoord_connect(mapping) as c:
        assert c.ping().kind == backend
        assert c.namespace == "mapped"
        assert c.settings.request_timeout == 2.5
