"""A three-member etcd cluster loses its leader (SIGKILL, or SIGSTOP) under a client that
holds a lock, is in a group, or runs two-phase commits.

The client talks to the leader itself when the fault hits (the worst case: every request
in flight hangs or fails, and so does its watch stream). The quorum of the two other
members elects a new leader and keeps serving; the client must follow within
``FOLLOW_BOUND`` (measured: about 1.5 s for both faults, see docs/topologies.md, etcd),
its lease must survive (the new leader extends every lease on election), fences stay
increasing, and every 2PC decision acknowledged to the caller is still in the log.

Negative control: a client given the leader's address alone cannot follow; it gets
BackendUnavailable until the member comes back, which shows that the fault does cut the
leader off and that it is the other addresses that carry the client through.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dcoord
from dcoord.participants import KVParticipant
from tests.servers import HOST, Server
from tests.topologies.etcd import EtcdCluster

# etcd.env: election timeout 1 s (a new leader within 1-2 s); each attempt of a request
# gets a third of the request timeout. Generous for a loaded 2-core machine.
FOLLOW_BOUND = 10.0
REQUEST_TIMEOUT = 3.0
# Long enough to outlast an election and a failed keep-alive or two.
TTL = 6.0
FAULTS = ("kill", "pause")
TX_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def cluster(servers: Any) -> Iterator[EtcdCluster]:
    with EtcdCluster(**servers.security()) as started:
        started.start()
        yield started


@pytest.fixture
def connect(cluster: EtcdCluster, namespace: str) -> Iterator[Callable[..., dcoord.Client]]:
    """``connect(url=None)``: a client of the cluster (or of ``url``), closed after the
    test, which then heals the cluster (a killed member restarts with its data)."""
    clients: list[dcoord.Client] = []

    def make(url: str | None = None) -> dcoord.Client:
        base = url or cluster.url
        joiner = "&" if "?" in base else "?"
        client = dcoord.connect(
            f"{base}{joiner}request_timeout={REQUEST_TIMEOUT:g}", namespace=namespace
        )
        clients.append(client)
        return client

    yield make
    cluster.heal()
    for client in clients:
        client.close()


def on_member(client: dcoord.Client, member: Server) -> None:
    """Send ``client``'s requests to ``member`` (the client picks one at random)."""
    client.backend.etcd._current_endpoint_label = f"{HOST}:{member.port}"  # type: ignore[attr-defined]


def fault(cluster: EtcdCluster, kind: str) -> Server:
    return cluster.kill_leader() if kind == "kill" else cluster.pause_leader()


def until_served(op: Callable[[], Any]) -> tuple[Any, float]:
    """Retry ``op`` through BackendUnavailable until it answers; (its result, seconds)."""
    started = time.monotonic()
    while True:
        try:
            return op(), time.monotonic() - started
        except dcoord.BackendUnavailable:
            if time.monotonic() - started > 3 * FOLLOW_BOUND:
                raise


@pytest.mark.parametrize("kind", FAULTS)
def test_lock_is_kept_and_fences_increase_across_a_leader_failover(
    cluster: EtcdCluster, connect: Callable[..., dcoord.Client], kind: str
) -> None:
    holder = connect()
    on_member(holder, cluster.leader())
    lost = threading.Event()
    lock = holder.lock("failover", ttl=TTL, on_lost=lambda _: lost.set())
    assert lock.acquire(timeout=10)
    first = lock.fence
    fence = holder.fence("resource")
    assert fence.admit(first)

    old_leader = fault(cluster, kind)
    admitted, took = until_served(lambda: fence.admit(first))
    assert admitted and took < FOLLOW_BOUND, f"followed the new leader after {took:.2f} s"
    assert cluster.leader() is not old_leader
    # The lease outlives the election: the lock is neither lost nor taken for two TTLs.
    rival = connect()
    assert not rival.lock("failover", ttl=TTL).acquire(timeout=2 * TTL)
    assert not lost.is_set() and lock.held

    lock.release()
    second = rival.lock("failover", ttl=TTL)
    assert second.acquire(timeout=10)
    assert second.fence > first
    assert rival.fence("resource").admit(second.fence)
    assert not fence.admit(first), "a stale fence was admitted after a newer one"

    cluster.heal()  # the old leader is back (restarted with its log, or resumed)
    second.release()
    third = holder.lock("failover", ttl=TTL)
    assert third.acquire(timeout=10)
    assert third.fence > second.fence


@pytest.mark.parametrize("kind", FAULTS)
def test_member_stays_and_live_ring_follows_across_a_leader_failover(
    cluster: EtcdCluster, connect: Callable[..., dcoord.Client], kind: str
) -> None:
    member_client, watcher = connect(), connect()
    leader = cluster.leader()
    on_member(member_client, leader)
    on_member(watcher, leader)
    lost = threading.Event()
    member_client.group("g").join("a", ttl=TTL, on_lost=lambda _: lost.set())
    ring = watcher.group("g").ring()
    assert ring.wait_for(lambda r: "a" in r.members, timeout=10)

    fault(cluster, kind)
    started = time.monotonic()
    newcomer = connect()
    until_served(lambda: newcomer.group("g").join("b", ttl=TTL))
    # The watch stream died with the leader's connection: the ring watches again on
    # another member and sees the newcomer.
    assert ring.wait_for(lambda r: set(r.members) == {"a", "b"}, timeout=FOLLOW_BOUND)
    took = time.monotonic() - started
    assert took < FOLLOW_BOUND, f"the ring followed after {took:.2f} s"
    # "a" kept its lease through the election; it is still a member two TTLs later.
    assert not lost.wait(2 * TTL)
    assert set(watcher.group("g").members()) == {"a", "b"}


@pytest.mark.parametrize("kind", FAULTS)
def test_acknowledged_2pc_decisions_survive_a_leader_failover(
    cluster: EtcdCluster, connect: Callable[..., dcoord.Client], kind: str
) -> None:
    client = connect()
    on_member(client, cluster.leader())
    banks = [KVParticipant(client, name) for name in ("a", "b")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcoord.DurabilityWarning)
        coord = client.coordinator(participants=banks)
    with coord.transaction() as tx:
        tx.enlist("a", {"set": {"alice": 1000}})
        tx.enlist("b", {"set": {"bob": 0}})

    acknowledged: list[str] = []
    unknown: list[str] = []
    stop = threading.Event()

    def transfers() -> None:
        while not stop.is_set():
            tx = coord.begin(timeout=TX_TIMEOUT)
            tx.enlist("a", {"add": {"alice": -1}})
            tx.enlist("b", {"add": {"bob": 1}})
            try:
                tx.commit()
                acknowledged.append(tx.txid)
            except dcoord.DcoordError:
                unknown.append(tx.txid)  # aborted, or its outcome is not known yet

    worker = threading.Thread(target=transfers)
    worker.start()
    try:
        # A few transactions before the fault, then the fault, then some after it.
        deadline = time.monotonic() + FOLLOW_BOUND
        while len(acknowledged) < 3 and time.monotonic() < deadline:
            stop.wait(0.05)
        fault(cluster, kind)
        before = len(acknowledged)
        deadline = time.monotonic() + 3 * FOLLOW_BOUND
        while len(acknowledged) < before + 3 and time.monotonic() < deadline:
            stop.wait(0.05)
    finally:
        stop.set()
        worker.join()
    assert len(acknowledged) >= before + 3, "no transaction committed after the failover"

    cluster.heal()
    # Transactions whose outcome the failover hid end by recovery: committed if their
    # decision was logged, else aborted once past their deadline.
    deadline = time.monotonic() + TX_TIMEOUT + FOLLOW_BOUND
    while True:
        coord.recover()
        pending = [t for t in unknown if coord.resolve(t) == "pending"]
        in_doubt = [bank.in_doubt() for bank in banks]
        if not pending and in_doubt == [[], []]:
            break
        assert time.monotonic() < deadline, f"still unresolved: {pending}, {in_doubt}"
        stop.wait(0.2)
    for txid in acknowledged:
        assert coord.resolve(txid) == "committed", f"acknowledged {txid} lost"
    committed = len(acknowledged) + sum(coord.resolve(t) == "committed" for t in unknown)
    assert banks[0].get("alice") == 1000 - committed
    assert banks[1].get("bob") == committed


def test_control_a_client_of_the_paused_leader_alone_does_not_follow(
    cluster: EtcdCluster, connect: Callable[..., dcoord.Client]
) -> None:
    leader = cluster.leader()
    alone = connect(leader.url)
    fence = alone.fence("control")
    assert fence.admit(1)
    cluster.pause(leader)
    with pytest.raises(dcoord.BackendUnavailable):
        fence.admit(2)
    cluster.resume(leader)
    _, took = until_served(lambda: fence.admit(2))
    assert took < FOLLOW_BOUND
