"""dcoord's OpenTelemetry metrics on every backend, read through the SDK's in-memory reader."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dcoord
from tests.otel import Readings, reading_metrics
from tests.participants import Voter
from tests.servers import Server

Connect = Callable[..., dcoord.Client]
# The shortest lock TTL worth testing: etcd grants no lease under ~2 s.
TTL = {"memory": 0.5, "redis": 0.5, "etcd": 2.0}


@pytest.fixture
def readings() -> Iterator[Readings]:
    with reading_metrics() as readings:
        yield readings


def here(backend: str, client: dcoord.Client, **more: str) -> dict[str, str]:
    return {"dcoord.backend": backend, "dcoord.namespace": client.namespace, **more}


def test_lock_grants_waits_timeouts_holds_and_losses(
    readings: Readings, connect: Connect, backend: str
) -> None:
    a, b = connect(), connect()
    attrs = here(backend, a)
    holder = a.lock("res", ttl=30)
    with holder:
        assert not b.lock("res").acquire(timeout=0.2)
    assert readings.value("dcoord.lock.grants", attrs) == 1
    assert readings.value("dcoord.lock.timeouts", attrs) == 1
    assert readings.value("dcoord.lock.wait", {**attrs, "dcoord.outcome": "granted"}) == 1
    assert readings.value("dcoord.lock.wait", {**attrs, "dcoord.outcome": "timeout"}) == 1
    assert readings.value("dcoord.lock.held", attrs) == 1
    waits = readings.points["dcoord.lock.wait"]
    timed_out = next(p for p in waits if p.attributes["dcoord.outcome"] == "timeout")
    assert timed_out.sum >= 0.2  # seconds, as the unit says

    lost = threading.Event()
    expiring = a.lock("short", ttl=TTL[backend], auto_renew=False, on_lost=lambda _: lost.set())
    assert expiring.acquire(blocking=False)
    assert lost.wait(TTL[backend] + 5)
    assert readings.value("dcoord.lock.lost", attrs) == 1
    assert readings.value("dcoord.lock.held", attrs) == 2
    assert readings.value("dcoord.lock.renewal.failures") == 0


def test_membership_joins_leaves_and_size_per_group(
    readings: Readings, connect: Connect, backend: str
) -> None:
    a, b = connect(), connect()
    group = a.group("g")
    m1 = group.join("m1")
    b.group("g").join("m2")
    a.group("other").join("x")
    assert len(group.view()) == 2
    g = here(backend, a, **{"dcoord.group": "g"})
    assert readings.value("dcoord.membership.size", g) == 2
    assert readings.value("dcoord.membership.joins", g) == 2
    with group.ring() as ring:
        m1.leave()
        assert ring.wait_for(lambda r: len(r) == 1, timeout=10)
        deadline = time.monotonic() + 10  # the follower publishes the size it read
        while readings.value("dcoord.membership.size", g) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert readings.value("dcoord.membership.leaves", g) == 1
    assert readings.value("dcoord.membership.joins", here(backend, a)) == 3
    assert readings.value("dcoord.membership.expiries") == 0


class Crash(BaseException):
    """Raised by a failpoint: the coordinator stops dead, like a killed process."""


def test_transactions_commits_aborts_latency_recovery_and_resolutions(
    readings: Readings, client: dcoord.Client, backend: str
) -> None:
    def coordinator(**options: Any) -> dcoord.Coordinator:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dcoord.DurabilityWarning)
            return client.coordinator(
                [Voter("a"), Voter("b"), Voter("no", vote=False)], max_clock_skew=0, **options
            )

    coord = coordinator()
    attrs = here(backend, client)
    with coord.transaction() as tx:
        tx.enlist("a")
        tx.enlist("b")
    with pytest.raises(dcoord.TransactionAborted), coord.transaction() as refused:
        refused.enlist("a")
        refused.enlist("no")
    assert readings.value("dcoord.tx.commits", attrs) == 1
    assert readings.value("dcoord.tx.aborts", attrs) == 1
    assert readings.value("dcoord.tx.duration", {**attrs, "dcoord.outcome": "committed"}) == 1
    assert readings.value("dcoord.tx.duration", {**attrs, "dcoord.outcome": "aborted"}) == 1
    assert coord.resolve(tx.txid) == "committed"
    assert coord.resolve("f" * 32) == "aborted"  # no record: presumed abort
    resolved = "dcoord.tx.in_doubt.resolutions"
    assert readings.value(resolved, {**attrs, "dcoord.outcome": "committed"}) == 1
    assert readings.value(resolved, {**attrs, "dcoord.outcome": "aborted"}) == 1
    coord.close()  # its background "done" writes are in: nothing of it is left to recover

    def crash(point: str, txid: str, participant: str | None) -> None:
        if point == "after_decision":
            raise Crash(point)

    with pytest.raises(Crash), coordinator(failpoint=crash).transaction() as crashed:
        crashed.enlist("a")
    assert readings.value("dcoord.tx.duration", {**attrs, "dcoord.outcome": "unknown"}) == 1
    assert coordinator().recover().committed == [crashed.txid]
    assert readings.value("dcoord.tx.recoveries", attrs) == 1
    assert readings.value("dcoord.tx.recovered", {**attrs, "dcoord.outcome": "committed"}) == 1
    assert readings.value("dcoord.tx.recovered") == 1


def test_backend_errors_by_kind(
    readings: Readings, real_backend: str, server_factory: Callable[..., Server], namespace: str
) -> None:
    server = server_factory(real_backend, persistent=False)
    with dcoord.connect(server.url, namespace=namespace, request_timeout=0.5) as client:
        client.ping()
        assert readings.value("dcoord.backend.errors") == 0  # negative control
        server.pause()
        try:
            with pytest.raises(dcoord.BackendUnavailable):
                client.ping()
        finally:
            server.resume()
        attrs = here(real_backend, client, **{"error.type": "BackendUnavailable"})
        assert readings.value("dcoord.backend.errors", attrs) >= 1
