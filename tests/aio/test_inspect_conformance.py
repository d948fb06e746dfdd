"""Inspection (``await client.locks()``, ``await lock.info()``, ``await client.groups()``)
on the async API: the whole sync suite of tests/conformance/test_inspect.py (imported,
not copied) through the adapter, and what sync and async clients see of each other."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator

import pytest

import dcoord
from dcoord import inspect
from dcoord.errors import ClientClosed
from dcoord.inspect import LockInfo
from tests.aio.adapter import SyncView
from tests.conformance import test_inspect


def _imported() -> dict[str, object]:
    return {
        name: value
        for name, value in vars(test_inspect).items()
        if name.startswith("test_") and callable(value)
    }


globals().update(_imported())

ME = f"{socket.gethostname()}:{os.getpid()}"


@pytest.fixture
def sync_client(aio_url: str, namespace: str) -> Iterator[dcoord.Client]:
    """A sync client of the async clients' server and namespace."""
    with dcoord.connect(aio_url, namespace=namespace, label="sync side") as client:
        yield client


def _same(found: list[LockInfo]) -> list[tuple[object, ...]]:
    return [(i.name, i.holder, i.label, i.fence, i.acquired_at, i.waiters) for i in found]


def test_async_sees_sync_holders_and_sync_sees_async_ones(
    connect: Callable[..., SyncView], sync_client: dcoord.Client
) -> None:
    aio = connect(label="async side")
    with sync_client.lock("mixed/s", ttl=20) as sync_lock:
        seen = aio.lock("mixed/s").info()
        assert seen is not None
        assert (seen.holder, seen.label, seen.fence) == (ME, "sync side", sync_lock.fence)
        with aio.lock("mixed/a", ttl=20) as async_lock:
            by_sync = sync_client.lock("mixed/a").info()
            assert by_sync is not None
            assert (by_sync.label, by_sync.fence) == ("async side", async_lock.fence)
            listed = [(i.name, i.label) for i in aio.locks("mixed/")]
            assert listed == [("mixed/a", "async side"), ("mixed/s", "sync side")]
            # Both read the same fields (all but the TTL left, which ticks between reads).
            assert _same(sync_client.locks("mixed/")) == _same(aio.locks("mixed/"))
    assert aio.locks("mixed/") == []


def test_groups_lists_the_groups_of_sync_and_async_members(
    connect: Callable[..., SyncView], sync_client: dcoord.Client
) -> None:
    aio = connect()
    assert aio.run(aio.aio.groups()) == []
    # Async membership refuses a Redis Cluster (tests/aio/conftest.py): there a second
    # sync member stands in for the async one; listing groups works on every topology.
    joiner = sync_client if aio.aio.settings.topology == "cluster" else aio
    members = [
        sync_client.group("from-sync").join("s1", ttl=20),
        joiner.group("from-async").join("a1", ttl=20),
    ]
    try:
        assert aio.run(aio.aio.groups()) == ["from-async", "from-sync"]
        assert inspect.groups(sync_client.backend) == ["from-async", "from-sync"]
    finally:
        for member in members:
            member.leave()


def test_inspection_on_a_closed_client_raises_client_closed(
    connect: Callable[..., SyncView],
) -> None:
    aio = connect()
    lock = aio.aio.lock("x")
    aio.run(aio.aio.close())
    with pytest.raises(ClientClosed):
        aio.run(aio.aio.locks())
    with pytest.raises(ClientClosed):
        aio.run(aio.aio.groups())
    with pytest.raises(ClientClosed):
        aio.run(lock.info())
