"""dcoord on a Redis Cluster of three primaries (one replica each) under failover.

Waiters are woken through shard channels on the node that serves the lock's slot, and a
killed primary's replica takes over: the same client follows it (redis-py refreshes its
slot map on the broken connection) and every fence granted afterwards is larger than
every fence granted before.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis.cluster import key_slot

import dcoord
from dcoord.cli import main
from dcoord.errors import BackendUnavailable, DcoordError
from tests.conftest import Servers
from tests.servers import free_port
from tests.topologies.cluster import ClusterSet

# Fast failure detection; the follow bound below is measured, not assumed.
FAILOVER_DEADLINE = 30.0


@pytest.fixture(scope="module")
def cluster(servers: Servers) -> Iterator[ClusterSet]:
    # min-replicas-to-write 0: the promoted replica has no replica of its own until the
    # killed node is back, and the test takes locks right after the promotion.
    started = ClusterSet(min_replicas_to_write=0, **servers.security())
    try:
        started.start()
    except BaseException:
        started.stop()
        raise
    yield started
    started.stop()


def lock_key(namespace: str, name: str) -> str:
    return f"dcoord:{namespace}:lock:{{{name}}}"


def names_on_every_primary(cluster: ClusterSet, namespace: str) -> list[str]:
    """One lock name per primary (found by trying names; the slot map says where)."""
    found: dict[int, str] = {}
    for i in range(1000):
        name = f"spread-{i}"
        found.setdefault(cluster.primary_for(lock_key(namespace, name)).port, name)
        if len(found) == 3:
            return list(found.values())
    raise AssertionError(f"1000 names hashed to only {len(found)} primaries")


def shard_subscribers(cluster: ClusterSet, channel: str) -> tuple[int, int]:
    """(shard subscribers on the channel's primary, plain subscribers on every node)."""
    primary = cluster.primary_for(channel)
    admin = primary.redis_admin()
    try:
        ((_, sharded),) = admin.pubsub_shardnumsub(channel)
    finally:
        admin.close()
    plain = 0
    for node in cluster.live():
        admin = node.redis_admin()
        try:
            plain += admin.pubsub_numsub(channel)[0][1]
        finally:
            admin.close()
    return int(sharded), plain


def wait_until(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def test_waiters_on_every_primary_are_woken_through_shard_channels(
    cluster: ClusterSet, namespace: str
) -> None:
    names = names_on_every_primary(cluster, namespace)
    with (
        dcoord.connect(cluster.url, namespace=namespace) as holder,
        dcoord.connect(cluster.url, namespace=namespace) as waiter,
    ):
        # A TTL far above the wake-up bound: a waiter woken in time was woken by the
        # release message, not by the holder's TTL running out.
        held = [holder.lock(name, ttl=60) for name in names]
        for lock in held:
            lock.acquire()
        got = {name: threading.Event() for name in names}

        def wait(name: str) -> None:
            with waiter.lock(name, ttl=10, timeout=50):
                got[name].set()

        threads = [threading.Thread(target=wait, args=(n,), daemon=True) for n in names]
        for thread in threads:
            thread.start()
        channels = [lock_key(namespace, name) + ":released" for name in names]
        assert wait_until(
            lambda: all(shard_subscribers(cluster, c) == (1, 0) for c in channels), 10
        ), [shard_subscribers(cluster, c) for c in channels]
        released = time.monotonic()
        for lock in held:
            lock.release()
        for name in names:
            assert got[name].wait(10), name
        woken_after = time.monotonic() - released
        for thread in threads:
            thread.join(10)
    assert woken_after < 10  # vs the 60 s TTL


def test_an_unreachable_cluster_is_backend_unavailable() -> None:
    # RedisCluster reads the slot map as it is made, and raises RedisClusterException
    # (not a RedisError) when no startup node answers.
    url = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="connect to redis"):
        dcoord.connect(url, connect_timeout=0.5)
    assert time.monotonic() - started < 10


def grant(client: dcoord.Client, name: str, timeout: float) -> int:
    """Acquire and release lock ``name``; its fence."""
    with client.lock(name, ttl=2, timeout=timeout) as lock:
        return lock.fence


def test_a_killed_primary_is_followed_and_fences_keep_increasing(
    cluster: ClusterSet, namespace: str
) -> None:
    name = "failover"
    key = lock_key(namespace, name)
    with dcoord.connect(cluster.url, namespace=namespace, request_timeout=2) as client:
        before = [grant(client, name, 5) for _ in range(20)]
        assert before == sorted(set(before))
        old = cluster.primary_for(key)
        killed = time.monotonic()
        cluster.kill_primary_of(key)
        after = None
        errors: list[str] = []
        while time.monotonic() - killed < FAILOVER_DEADLINE:
            try:
                after = grant(client, name, 1)
                break
            except DcoordError as exc:  # the slot has no primary yet, or the lock waits
                errors.append(type(exc).__name__)
        follow = time.monotonic() - killed
        assert after is not None, f"not followed in {FAILOVER_DEADLINE} s: {set(errors)}"
        new = cluster.wait_for_failover(old, key)
        assert new is not old
        assert after > max(before)
        # Later grants go on increasing on the new primary.
        again = grant(client, name, 5)
        assert again > after
    print(f"\nfollow time after killing the primary of {key!r}: {follow:.2f} s")
    cluster.restart(old)  # it rejoins as a replica of the node that took over
    cluster.wait_healthy()
    assert cluster.primary_for(key) is new


def test_doctor_reads_the_persistence_of_every_node(
    cluster: ClusterSet, capsys: pytest.CaptureFixture[str]
) -> None:
    # A replica is promoted at a failover with its own settings: one that would lose
    # writes must fail the check, whichever node the client asks by default.
    replica = cluster.replicas_of(cluster.primary_for("{x}"))[0]
    admin = replica.redis_admin()
    try:
        admin.config_set("appendfsync", "everysec")
        main(["doctor", cluster.url, "--json"])
        checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    finally:
        admin.config_set("appendfsync", "always")
        admin.close()
    assert checks["persistence"]["status"] == "fail", checks["persistence"]
    assert f"everysec on 127.0.0.1:{replica.port}" in checks["persistence"]["detail"]


def test_lock_slots_are_spread_over_the_primaries(cluster: ClusterSet, namespace: str) -> None:
    ports = {cluster.primary_for(lock_key(namespace, f"n{i}")).port for i in range(200)}
    assert len(ports) == 3
    # Every key of one lock (token, fence counter, channel) is in one slot.
    key = lock_key(namespace, "x")
    assert len({key_slot(k.encode()) for k in (key, f"{key}:fence", f"{key}:released")}) == 1
