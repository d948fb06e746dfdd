"""``min_replicas``: forced 2PC log writes WAIT for replicas, on real servers.

Each test owns its primary (``server_factory``) and, where it needs one, a replica of
it (the same provider, ``--replicaof``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dcoord
from dcoord import txlog
from dcoord.participants import KVParticipant
from tests.conformance.test_redis_layout import Recorder
from tests.conftest import Servers
from tests.servers import HOST, ContainerServer, ProcessServer, Server, provider

REPLICA_TIMEOUT = 0.5


@pytest.fixture
def primary(server_factory: Callable[..., Server]) -> Server:
    return server_factory("redis", persistent=False)


@pytest.fixture
def replica(primary: Server, servers: Servers) -> Iterator[Server]:
    """A replica of ``primary``, its link up."""
    options = servers.security()
    server: Server = (ContainerServer if provider() == "containers" else ProcessServer)(
        "redis", persistent=False, **options
    )
    args = ["--replicaof", HOST, str(primary.port)]
    if options.get("password"):
        args += ["--masterauth", options["password"]]
    if options.get("tls"):
        args += ["--tls-replication", "yes"]
    server.redis_args = tuple(args)
    try:
        server.start()
        admin = server.redis_admin()
        try:
            deadline = time.monotonic() + 30
            while admin.info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "the replica did not sync in 30 s"
                time.sleep(0.05)
        finally:
            admin.close()
        yield server
    finally:
        server.stop()


@pytest.fixture
def connect(primary: Server, namespace: str) -> Iterator[Callable[..., dcoord.Client]]:
    clients: list[dcoord.Client] = []

    def make(**options: Any) -> dcoord.Client:
        client = dcoord.connect(primary.url, namespace=namespace, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def coordinator(client: dcoord.Client, *parts: Any, **options: Any) -> dcoord.Coordinator:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcoord.DurabilityWarning)
        return client.coordinator(participants=parts, **options)


def started(client: dcoord.Client, txid: str) -> bytes:
    record = txlog.new_record(txid, {"p": None}, now=client.backend.txlog.now(), timeout=30)
    return txlog.encode(record)


def test_too_few_replicas_is_a_typed_error_after_replica_timeout(
    connect: Callable[..., dcoord.Client],
) -> None:
    timeout = 1.0
    client = connect(min_replicas=1, replica_timeout=timeout)
    log = client.backend.txlog
    log.now()  # connected: the time below is the write's
    begun = time.monotonic()
    with pytest.raises(dcoord.BackendUnavailable, match=r"only 0 replica\(s\) of min_replicas=1"):
        log.create("tx-1", started(client, "tx-1"), time.time() + 30)
    took = time.monotonic() - begun
    # One WAIT, not two (a first EVALSHA refused for NOSCRIPT would add a second).
    assert timeout * 0.9 <= took < timeout * 1.8, took
    # A coordinator reports it as an abort: no participant was asked.
    part = KVParticipant(client, "bank")
    coord = coordinator(client, part)
    aborted = pytest.raises(dcoord.TransactionAborted, match="min_replicas=1")
    with aborted, coord.transaction() as tx:
        tx.enlist("bank", {"set": {"alice": 1}})
    assert part.get("alice") is None and part.in_doubt() == []
    coord.close()


def test_no_wait_is_sent_without_min_replicas(
    connect: Callable[..., dcoord.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """min_replicas=0 (the default) costs nothing: no WAIT at all. Control: with
    min_replicas the same commit sends WAIT (and fails here: the server has no replica)."""
    recorder = Recorder()
    recorder.install(monkeypatch)
    client = connect()
    coord = coordinator(client, KVParticipant(client, "bank"))
    with coord.transaction() as tx:
        tx.enlist("bank", {"set": {"alice": 1}})
    coord.close()
    assert "EVALSHA" in recorder.names() and "WAIT" not in recorder.names()
    waiting = connect(min_replicas=1, replica_timeout=REPLICA_TIMEOUT)
    with pytest.raises(dcoord.BackendUnavailable):
        waiting.backend.txlog.create("tx-2", started(waiting, "tx-2"), time.time() + 30)
    assert "WAIT" in recorder.names()


def test_replica_timeout_must_be_below_request_timeout(primary: Server) -> None:
    with pytest.raises(dcoord.ConfigError, match="replica_timeout"):
        dcoord.connect(primary.url, min_replicas=1, replica_timeout=5, request_timeout=5)


def test_forced_writes_succeed_with_a_replica_that_has_them(
    connect: Callable[..., dcoord.Client], replica: Server
) -> None:
    client = connect(min_replicas=1, replica_timeout=REPLICA_TIMEOUT)
    part = KVParticipant(client, "bank")
    coord = coordinator(client, part)
    with coord.transaction() as tx:
        tx.enlist("bank", {"set": {"alice": 1}})
    assert part.get("alice") == 1
    # WAIT returned: the replica holds the decision already, no need to wait for it.
    admin = replica.redis_admin()
    try:
        stored = admin.get(client.backend.txlog.record_key(tx.txid))
    finally:
        admin.close()
    assert stored is not None and txlog.decode(tx.txid, stored).outcome == "committed"
    coord.close()


def test_a_decision_the_replicas_lack_is_not_reported_committed(
    connect: Callable[..., dcoord.Client], replica: Server
) -> None:
    """The replica stops acknowledging between the yes vote and the decision: the commit
    decision reaches the primary only. commit() must not report it committed nor tell
    any participant to commit (a failover could lose the decision after they did); once
    the replica is back, recover() confirms it and commits."""
    client = connect(min_replicas=1, replica_timeout=REPLICA_TIMEOUT)
    part = KVParticipant(client, "bank")

    def pause_replica(point: str, txid: str, participant: str | None) -> None:
        if point == "after_prepare":  # the participant's yes is on the replica
            replica.pause()

    coord = coordinator(client, part, failpoint=pause_replica)
    tx = coord.begin()
    tx.enlist("bank", {"set": {"alice": 1}})
    try:
        with pytest.raises(dcoord.BackendUnavailable, match="min_replicas=1"):
            tx.commit()
        assert part.get("alice") is None
        assert part.in_doubt() == [tx.txid]
        # A participant asking for the outcome is not told "committed" either.
        with pytest.raises(dcoord.BackendUnavailable, match="min_replicas=1"):
            coord.resolve(tx.txid)
    finally:
        replica.resume()
    report = coord.recover()
    assert report.committed == [tx.txid], report
    assert part.get("alice") == 1 and part.in_doubt() == []
    coord.close()


def test_a_participant_does_not_vote_yes_on_a_primary_alone(
    connect: Callable[..., dcoord.Client],
) -> None:
    """KVParticipant's staging is a forced write too: without the replicas asked for, its
    prepare fails instead of voting yes on a staged record a failover could lose."""
    client = connect(min_replicas=1, replica_timeout=REPLICA_TIMEOUT)
    part = KVParticipant(client, "bank")
    with pytest.raises(dcoord.BackendUnavailable, match="min_replicas=1"):
        part.prepare("tx-1", {"set": {"alice": 1}})
    # Staged on the primary only, and no yes given: the coordinator aborts it (once the
    # replicas answer: its abort is a forced write too).
    assert part.in_doubt() == ["tx-1"]


def test_the_namespace_acl_rule_allows_the_wait(primary: Server, namespace: str) -> None:
    """A user confined by what ``dcoord acl redis`` prints may send WAIT: it gets the
    replica error, not PermissionDenied."""
    url = primary.confine(namespace, f"u-{namespace}", "user-pw")
    with (
        dcoord.connect(
            url, namespace=namespace, min_replicas=1, replica_timeout=REPLICA_TIMEOUT
        ) as client,
        pytest.raises(dcoord.BackendUnavailable, match="min_replicas=1"),
    ):
        client.backend.txlog.create("tx-1", started(client, "tx-1"), time.time() + 30)
