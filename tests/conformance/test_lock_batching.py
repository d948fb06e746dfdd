"""Batched lock renewals (issue 16): renewals due together share one round trip.

On Redis the watchdog sends the EXTEND scripts of the locks due in one tick in one
pipeline, each still compared with its own token; on etcd the locks on the client's
shared lease are renewed by its one keep-alive, so a batch sends nothing. The round trips
are counted by the server (``INFO``: ``total_reads_processed`` counts each read of a
request from a connection, ``commandstats`` each script run), never by MONITOR.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dcoord
from dcoord.backends.base import LockSlot, Renewed

pytestmark = pytest.mark.parametrize("real_backend", ["redis"], indirect=True)

TTL = 1.5
LOCKS = 20


@pytest.fixture
def client(real_backend_url: str, namespace: str) -> Iterator[dcoord.Client]:
    with dcoord.connect(real_backend_url, namespace=namespace) as client:
        if client.backend.locks.cluster:  # type: ignore[attr-defined]
            pytest.skip("a Redis Cluster: tests/conformance/test_cluster_lock_batching.py")
        yield client


class BatchSpy:
    """Records the size of each batch the watchdog sends (the real batch runs)."""

    def __init__(self, client: dcoord.Client) -> None:
        self.renewals: Any = client.backend.locks.renewals  # type: ignore[attr-defined]
        self.real = self.renewals.extend_many
        self.sizes: list[int] = []
        self.grew = threading.Event()
        self.renewals.extend_many = self

    def __call__(self, requests: list[tuple[LockSlot, float]]) -> list[Renewed]:
        answers: list[Renewed] = self.real(requests)
        self.sizes.append(len(requests))
        if len(requests) > 1:
            self.grew.set()
        return answers


def server_counts(client: dcoord.Client) -> tuple[int, int]:
    """(requests read by the server, EXTEND script runs) so far, in one INFO command."""
    info = client.backend.redis.info("everything")  # type: ignore[attr-defined]
    return int(info["total_reads_processed"]), int(info.get("cmdstat_evalsha", {}).get("calls", 0))


def lost_names() -> tuple[list[str], threading.Event, Callable[[dcoord.Lock], None]]:
    names: list[str] = []
    event = threading.Event()

    def on_lost(lock: dcoord.Lock) -> None:
        names.append(lock.name)
        event.set()

    return names, event, on_lost


def held_through(locks: list[dcoord.Lock], seconds: float) -> None:
    """Assert every lock of ``locks`` stays held for ``seconds`` (polled)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert all(lock.held for lock in locks), [lock.name for lock in locks if not lock.held]
        time.sleep(0.05)


def test_a_batch_of_renewals_is_one_round_trip(client: dcoord.Client) -> None:
    locks = [client.lock(f"res{i}", ttl=60) for i in range(50)]
    for lock in locks:
        assert lock.acquire(blocking=False)
    renewals: Any = client.backend.locks.renewals  # type: ignore[attr-defined]
    requests = [(lock._slot, 60.0) for lock in locks]
    renewals.extend_many(requests[:1])  # the script is loaded, the connection open

    reads, scripts = server_counts(client)
    answers = renewals.extend_many(requests)
    reads_after, scripts_after = server_counts(client)
    assert all(isinstance(answer, dcoord.backends.base.LockGrant) for answer in answers)
    assert scripts_after - scripts == 50, "each lock still runs its own owner-checked script"
    # One read for the pipeline (a second if the kernel split it), one for the 2nd INFO.
    assert reads_after - reads - 1 <= 2, reads_after - reads

    # Negative control: the same renewals one by one cost a round trip each.
    reads, _ = server_counts(client)
    for lock in locks:
        assert lock._slot.extend(60.0) is not None
    reads_after, _ = server_counts(client)
    assert reads_after - reads - 1 >= 50
    for lock in locks:
        lock.release()


def test_the_watchdog_renews_locks_due_together_in_shared_round_trips(
    client: dcoord.Client,
) -> None:
    """Before, each renewal was a request of its own: as many server reads as scripts,
    and a client with 10,000 locks at TTL 1-3 s could not renew them all in time."""
    locks = [client.lock(f"res{i}", ttl=TTL) for i in range(40)]
    for lock in locks:
        assert lock.acquire(blocking=False)
    reads, scripts = server_counts(client)
    polls = 0
    deadline = time.monotonic() + TTL * 10
    while True:  # until every lock was renewed about twice
        polls += 1
        reads_now, scripts_now = server_counts(client)
        if scripts_now - scripts >= 2 * len(locks) or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    renewed = scripts_now - scripts
    assert renewed >= 2 * len(locks), f"only {renewed} renewals"
    # Each poll (an INFO) is one read; the renewals' reads are what is left.
    assert reads_now - reads - polls <= renewed / 4, (reads_now - reads - polls, renewed)
    assert all(lock.held for lock in locks)
    for lock in locks:
        lock.release()


def test_a_batch_where_one_lock_was_lost_reports_exactly_that_one(
    client: dcoord.Client,
) -> None:
    names, lost, on_lost = lost_names()
    spy = BatchSpy(client)
    locks = [client.lock(f"res{i}", ttl=TTL, on_lost=on_lost) for i in range(LOCKS)]
    for lock in locks:
        assert lock.acquire(blocking=False)
    # Acquired together, they are renewed together: wait for a batch of several.
    assert spy.grew.wait(TTL * 5), f"renewals were never batched: {spy.sizes}"
    victim = locks[LOCKS // 2]
    client.backend.redis.delete(victim._slot.key)  # type: ignore[attr-defined]  # a failover ate it

    assert lost.wait(TTL * 3), "the lock the server no longer has must be reported lost"
    assert names == [victim.name]
    assert not victim.held
    survivors = [lock for lock in locks if lock is not victim]
    held_through(survivors, TTL * 2)  # renewed in batches all the while
    assert names == [victim.name], "exactly the one lost lock is reported"
    assert max(spy.sizes) > 1
    with pytest.raises(dcoord.LockNotOwned):
        victim.release()
    for lock in survivors:
        lock.release()


def test_an_error_reply_in_a_batch_fails_only_its_own_lock(client: dcoord.Client) -> None:
    """Each script of the pipeline has its own reply: a key of the wrong type makes its
    EXTEND fail (WRONGTYPE), which retries that lock until its deadline and loses it,
    while the other locks of the same batches renew."""
    names, lost, on_lost = lost_names()
    spy = BatchSpy(client)
    locks = [client.lock(f"res{i}", ttl=TTL, on_lost=on_lost) for i in range(LOCKS)]
    for lock in locks:
        assert lock.acquire(blocking=False)
    assert spy.grew.wait(TTL * 5), f"renewals were never batched: {spy.sizes}"
    victim = locks[0]
    redis_client: Any = client.backend.redis  # type: ignore[attr-defined]
    redis_client.delete(victim._slot.key)  # type: ignore[attr-defined]
    redis_client.hset(victim._slot.key, "not", "a lock")  # type: ignore[attr-defined]

    assert lost.wait(TTL * 3)
    assert names == [victim.name]
    survivors = locks[1:]
    held_through(survivors, TTL * 2)
    assert names == [victim.name]
    for lock in survivors:
        lock.release()
    redis_client.delete(victim._slot.key)  # type: ignore[attr-defined]
