"""Errors at the backend boundary: a driver's error is translated once, inside
``Backend.call``, so code after the boundary sees dcoord errors only (a handler of a raw
driver error there never runs). Real servers; the fault is injected in the client
library's call, the server is untouched."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pyetcd import exceptions as etcd_errors

import dcoord
from dcoord.backends.etcd import EtcdBackend


@pytest.fixture
def etcd_clients(servers: Any, namespace: str) -> Iterator[tuple[dcoord.Client, dcoord.Client]]:
    url = servers.url("etcd")
    with (
        dcoord.connect(url, namespace=namespace) as a,
        dcoord.connect(url, namespace=namespace) as b,
    ):
        yield a, b


def test_an_etcd_semaphore_waiter_whose_watch_times_out_waits_on(
    etcd_clients: tuple[dcoord.Client, dcoord.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    holder, waiter = etcd_clients
    held = holder.semaphore("s", 1, ttl=5)
    assert held.acquire(timeout=5)
    backend = waiter.backend
    assert isinstance(backend, EtcdBackend)
    refused: list[int] = []

    def watch_not_created(*args: Any, **kwargs: Any) -> Any:
        refused.append(1)
        raise etcd_errors.WatchTimedOut()

    monkeypatch.setattr(backend.etcd, "add_watch_callback", watch_not_created)
    waiting = waiter.semaphore("s", 1, ttl=5)
    # Without a watch the waiter re-checks shortly instead, and times out as usual (it
    # used to fail with BackendUnavailable: the handler was for the untranslated error).
    assert not waiting.acquire(timeout=0.5)
    assert refused
    held.release()
    assert waiting.acquire(timeout=10)
    waiting.release()
