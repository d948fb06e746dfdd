"""dcoord.metrics on the embedded backend: instruments read through the SDK's in-memory
reader, failures the conformance suite cannot provoke (a failing renewal, a lost member,
a broken exporter), metrics off, the global provider set late, and the Prometheus
example scraped over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, start_http_server

import dcoord
from dcoord import metrics
from tests.otel import Readings, reading_metrics
from tests.participants import Voter


@pytest.fixture
def readings() -> Iterator[Readings]:
    with reading_metrics() as readings:
        yield readings


@pytest.fixture
def client() -> Iterator[dcoord.Client]:
    with dcoord.connect(f"memory://m-{uuid.uuid4().hex[:8]}", namespace="unit") as c:
        yield c


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_hold_time_and_attributes(readings: Readings, client: dcoord.Client) -> None:
    lock = client.lock("job", ttl=30)
    with lock:
        pass
    assert readings.value("dcoord.lock.held") == 1
    assert readings.attributes("dcoord.lock.held") == [
        {"dcoord.backend": "memory", "dcoord.namespace": "unit"}
    ]
    assert readings.units["dcoord.lock.held"] == "s"
    assert readings.units["dcoord.lock.grants"] == "{grant}"
    # A second release records no second hold.
    with pytest.raises(dcoord.LockNotOwned):
        lock.release()
    assert readings.value("dcoord.lock.held") == 1


def test_lock_names_only_when_configured(readings: Readings, client: dcoord.Client) -> None:
    with client.lock("a"):
        pass
    assert all("dcoord.lock.name" not in a for a in readings.attributes("dcoord.lock.grants"))
    metrics.configure(meter_provider=readings.provider, lock_names=True)
    with client.lock("b"):
        pass
    assert readings.value("dcoord.lock.grants", {"dcoord.lock.name": "b"}) == 1


def test_failed_renewals_and_the_loss_they_cause(
    readings: Readings, client: dcoord.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthy, failing = client.lock("healthy", ttl=0.6), client.lock("failing", ttl=0.6)
    lost = threading.Event()
    failing._on_lost = lambda _: lost.set()
    assert healthy.acquire(blocking=False) and failing.acquire(blocking=False)

    def unreachable(ttl: float) -> None:
        raise dcoord.BackendUnavailable("extend: the server is unreachable")

    monkeypatch.setattr(failing._slot, "extend", unreachable)
    assert lost.wait(10)
    assert readings.value("dcoord.lock.renewal.failures") >= 1
    assert readings.value("dcoord.lock.lost") == 1
    assert readings.value("dcoord.lock.held") == 1  # the loss ended the hold
    # Negative control: the healthy lock renewed all the while, with no failure or loss.
    assert healthy.held
    with pytest.raises(dcoord.LockNotOwned):
        failing.release()
    healthy.release()
    assert readings.value("dcoord.lock.lost") == 1
    assert readings.value("dcoord.lock.held") == 2


def test_a_lost_member_is_an_expiry_a_leaving_one_a_leave(
    readings: Readings, client: dcoord.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = client.group("g")
    stays = group.join("stays", ttl=0.3)
    stays.leave()
    assert readings.value("dcoord.membership.leaves", {"dcoord.group": "g"}) == 1
    assert readings.value("dcoord.membership.expiries") == 0
    lost = threading.Event()
    member = group.join("goes", ttl=0.3, on_lost=lambda _: lost.set())
    # The server no longer has it at the next heart-beat (as after a long pause).
    monkeypatch.setattr(client.backend.groups, "refresh", lambda *args: False)
    assert lost.wait(10)
    assert readings.value("dcoord.membership.expiries", {"dcoord.group": "g"}) == 1
    assert readings.value("dcoord.membership.joins", {"dcoord.group": "g"}) == 2
    assert readings.value("dcoord.membership.leaves") == 1
    member.leave()  # leaving a lost member is no leave
    assert readings.value("dcoord.membership.leaves") == 1


class _Broken:
    """A meter (and provider) whose instruments raise, like a broken SDK or exporter."""

    def get_meter(self, *args: Any, **kwargs: Any) -> _Broken:
        return self

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("create_"):
            return lambda *args, **kwargs: self
        raise RuntimeError(f"broken instrument: {name}")


def test_recording_errors_never_reach_the_caller(client: dcoord.Client) -> None:
    metrics.configure(meter_provider=_Broken())  # type: ignore[arg-type]
    try:
        with client.lock("a"):
            pass
        client.group("g").join("m").leave()
        coord = client.coordinator([Voter("p")])
        with coord.transaction() as tx:
            tx.enlist("p")
        assert coord.resolve(tx.txid) == "committed"
        assert coord.recover().clean
    finally:
        metrics.configure()


def test_off_when_disabled_or_without_the_api(
    readings: Readings, client: dcoord.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics.configure(enabled=False)
    with client.lock("a"):
        pass
    assert readings.value("dcoord.lock.grants") == 0
    # The otel extra absent: importing opentelemetry fails and every hook returns at once.
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    metrics.configure()
    assert metrics._recording() is None
    with client.lock("a"):
        pass
    assert readings.value("dcoord.lock.grants") == 0
    # Negative control: the same calls with the API present are counted.
    monkeypatch.undo()
    metrics.configure(meter_provider=readings.provider)
    with client.lock("a"):
        pass
    assert readings.value("dcoord.lock.grants") == 1


def test_every_instrument_is_named_under_dcoord_and_documented() -> None:
    names: dict[str, str] = {}

    class Recorder:
        def __getattr__(self, kind: str) -> Callable[..., object]:
            def create(name: str, unit: str = "", description: str = "", **_: object) -> None:
                names[name] = unit

            return create

    metrics._Instruments(Recorder(), lock_names=False)  # type: ignore[arg-type]
    docs = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    assert len(names) >= 17
    for name, unit in names.items():
        assert name.startswith("dcoord.") and not name.endswith("_total"), name
        assert unit == "s" or (unit.startswith("{") and unit.endswith("}")), (name, unit)
        assert f"`{name}`" in docs, f"{name} is not listed in docs/observability.md"


def test_prometheus_example_is_scraped_over_http(client: dcoord.Client) -> None:
    """The example of docs/observability.md: a Prometheus endpoint on loopback."""
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    provider = MeterProvider(metric_readers=[reader])
    metrics.configure(meter_provider=provider)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        with client.lock("scraped"):
            pass
        port = server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        metrics.configure()
        provider.shutdown()
    assert 'dcoord_lock_grants_total{dcoord_backend="memory",dcoord_namespace="unit"' in text
    assert "dcoord_lock_wait_seconds_bucket{" in text
    assert "dcoord_lock_held_seconds_count{" in text


GLOBAL_PROVIDER = """
import time, dcoord
from dcoord import metrics
from opentelemetry import metrics as api
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

def grants(reader):
    data = reader.get_metrics_data()
    return sum(
        p.value
        for r in (data.resource_metrics if data else ())
        for s in r.scope_metrics
        for m in s.metrics
        if m.name == "dcoord.lock.grants"
        for p in m.data.data_points
    )

with dcoord.connect("memory://") as client:
    lock = client.lock("a")
    with lock:
        pass
    assert metrics._recording() is None, "no provider set: nothing to record"
    reader = InMemoryMetricReader()
    api.set_meter_provider(MeterProvider(metric_readers=[reader]))
    deadline = time.monotonic() + 30
    while grants(reader) == 0:  # picked up within a second of being set
        assert time.monotonic() < deadline, "the global provider was never used"
        with lock:
            pass
    print("ok")
"""


GLOBAL_PROVIDER_FIRST = """
import dcoord
from opentelemetry import metrics as api
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

reader = InMemoryMetricReader()
api.set_meter_provider(MeterProvider(metric_readers=[reader]))  # at start-up, as apps do
with dcoord.connect("memory://") as client:
    with client.lock("a"):
        pass
data = reader.get_metrics_data()
names = {m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}
assert "dcoord.lock.grants" in names, names
print("ok")
"""


def test_a_global_provider_set_before_dcoord_records_at_once() -> None:
    """The usual order: the application sets its provider at start-up, then uses dcoord.
    dcoord must not take that provider for the API's placeholder and drop everything."""
    child = subprocess.run(
        [sys.executable, "-c", GLOBAL_PROVIDER_FIRST],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert child.returncode == 0 and child.stdout.strip() == "ok", child.stderr


def test_a_global_provider_set_after_dcoord_started_is_used() -> None:
    """The default path: the application sets the global provider, maybe late.

    In a child process, since a process may set its global provider only once.
    """
    child = subprocess.run(
        [sys.executable, "-c", GLOBAL_PROVIDER],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert child.returncode == 0 and child.stdout.strip() == "ok", child.stderr
