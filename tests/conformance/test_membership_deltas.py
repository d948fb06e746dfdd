"""Followers apply the changes their notifications carry, and re-read when they cannot.

With the resync interval out of the way (10 minutes), a live ring must follow joins and
leaves without reading the group again (memory, Redis, etcd); on Redis, a change it
cannot apply must still reach it: a notification of a client from before deltas (the
bare epoch) or a change whose predecessor it never heard of (a gap) make it re-read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

import dcoord
from dcoord.core import membership as core
from dcoord.membership import _encode

Connect = Callable[..., dcoord.Client]

NEVER = 600.0  # a resync interval no test waits for
PATIENCE = 30.0  # generous: the machine is shared; a missed change never arrives at all


@pytest.fixture(autouse=True)
def _no_resync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "RESYNC_INTERVAL", NEVER)


def _count_reads(client: dcoord.Client, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    store: Any = client.backend.groups
    reads: list[str] = []
    read = store.read

    def counted(group: str) -> Any:
        reads.append(group)
        return read(group)

    monkeypatch.setattr(store, "read", counted)
    return reads


def test_a_follower_applies_changes_without_re_reading_the_group(
    connect: Connect, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    members_client, observer = connect(), connect()
    ring = observer.group("g").ring(vnodes=20)
    # A watch too: the follower's re-read for a new subscriber is done once it has a view.
    watching = threading.Event()
    observer.group("g").watch(lambda view: watching.set())
    assert watching.wait(PATIENCE)
    reads = _count_reads(observer, monkeypatch)
    group = members_client.group("g")
    joined = [group.join(f"m{i}", weight=1 + i % 3, ttl=30) for i in range(8)]
    for member in joined[:3]:
        member.leave()
    group.join("m0", meta={"again": True}, ttl=30)
    want = {"m0", *(f"m{i}" for i in range(3, 8))}
    assert ring.wait_for(lambda r: set(r.members) == want, PATIENCE)
    assert ring.members["m0"].meta == {"again": True}
    assert ring.ring == dcoord.HashRing(dict(ring.members.weights()), vnodes=20)
    # (On etcd the epoch is the store's revision, which other tests' expiries advance.)
    assert ring.epoch == group.epoch() if backend != "etcd" else ring.epoch <= group.epoch()
    assert reads == []  # every change arrived as a delta


def _redis_only(backend: str) -> None:
    if backend != "redis":
        pytest.skip("Redis notifications are published by the clients' own script")


def _sneak_in(client: dcoord.Client, group: str, member_id: str) -> tuple[int, str]:
    """Add ``member_id`` as a client from before deltas would, without notifying anyone;
    its epoch and the group's channel. (Its expiry is far off: it is not heart-beaten.)"""
    backend: Any = client.backend
    (expiries, payloads, owners, epoch_key), channel = backend.groups.keys(group)
    redis = backend.redis
    redis.zadd(expiries, {member_id: 10**15})
    redis.hset(payloads, member_id, _encode(1.0, {}))
    redis.hset(owners, member_id, "token-of-an-old-client")
    return int(redis.incr(epoch_key)), channel


def _publish(client: dcoord.Client, channel: str, message: bytes) -> None:
    backend: Any = client.backend
    sharded = backend.settings.topology == "cluster"
    (backend.redis.spublish if sharded else backend.redis.publish)(channel, message)


def test_an_old_clients_notification_makes_followers_re_read(
    connect: Connect, backend: str
) -> None:
    _redis_only(backend)
    writer, observer = connect(), connect()
    ring = observer.group("g").ring()
    writer.group("g").join("new", ttl=30)
    assert ring.wait_for(lambda r: "new" in r, PATIENCE)
    # An old client's membership.lua published only the epoch: no change to apply.
    epoch, channel = _sneak_in(writer, "g", "old")
    _publish(writer, channel, str(epoch).encode())
    assert ring.wait_for(lambda r: "old" in r, PATIENCE)
    assert ring.epoch == epoch


def test_a_gap_in_the_epochs_makes_followers_re_read(connect: Connect, backend: str) -> None:
    _redis_only(backend)
    writer, observer = connect(), connect()
    ring = observer.group("g").ring()
    # A change nobody was told about, then an ordinary join: its notification follows
    # an epoch the follower never saw.
    _sneak_in(writer, "g", "unannounced")
    writer.group("g").join("announced", ttl=30)
    assert ring.wait_for(lambda r: "announced" in r, PATIENCE)
    assert set(ring.members) == {"unannounced", "announced"}


def test_closing_the_client_right_after_its_last_ring_ends_the_follower(
    connect: Connect, namespace: str
) -> None:
    # The follower of a group whose last ring closed is no longer the group's; closing
    # the client must still wait for it, or the connection closes under its wait (on
    # Redis, redis-py then raises a TypeError that the follower logged as a bug).
    name = f"closing-{namespace}"
    for _ in range(3):
        client = connect()
        client.group(name).ring().close()
        client.close()
        assert not [t for t in threading.enumerate() if t.name == f"dcoord-follow-{name}"]
