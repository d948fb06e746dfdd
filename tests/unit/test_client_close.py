"""Client.close(): primitives, then the backend's stores, then background work (the
scheduler), then the connection; once, whatever thread calls it and however often."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import pytest

import dcoord

CLOSERS = 8


class Recorder:
    """Records, in order, the close steps of one client (on the memory backend)."""

    def __init__(self, client: dcoord.Client, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self._mutex = threading.Lock()
        for name, owner, attribute in (
            ("stores", client.backend, "close_stores"),
            ("scheduler", client.scheduler, "close"),
            ("connection", client.backend, "close"),
        ):
            monkeypatch.setattr(owner, attribute, self.wrap(name, getattr(owner, attribute)))

    def record(self, name: str) -> None:
        with self._mutex:
            self.calls.append(name)

    def wrap(self, name: str, fn: Callable[[], None]) -> Callable[[], None]:
        def recorded() -> None:
            self.record(name)
            fn()

        return recorded


@pytest.fixture
def url() -> str:
    return f"memory://t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(url: str) -> Iterator[dcoord.Client]:
    client = dcoord.connect(url)
    try:
        yield client
    finally:
        client.close()


def test_close_closes_primitives_then_stores_then_scheduler_then_connection(
    client: dcoord.Client, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(client, monkeypatch)
    lock = client.lock("job", ttl=30)
    assert lock.acquire(timeout=0)
    client.on_close(lambda: recorder.record("hook-1"))
    client.on_close(lambda: recorder.record("hook-2"))
    free_at_stores: list[bool] = []
    with dcoord.connect(url) as other:
        close_stores = client.backend.close_stores

        def stores_seeing_the_lock() -> None:
            # The primitives are closed by now: the held lock was released.
            probe = other.lock("job", ttl=5)
            free_at_stores.append(probe.acquire(timeout=0))
            probe.release()
            close_stores()

        monkeypatch.setattr(client.backend, "close_stores", stores_seeing_the_lock)
        client.close()
    # Hooks run newest first: the lock registry's came first, so it runs last.
    assert recorder.calls == ["hook-2", "hook-1", "stores", "scheduler", "connection"]
    assert free_at_stores == [True]
    assert not lock.held


def test_every_step_runs_when_one_before_it_fails(
    client: dcoord.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(client, monkeypatch)

    def failing_hook() -> None:
        recorder.record("hook")
        raise RuntimeError("hook failed")

    def failing_stores() -> None:
        recorder.record("stores")
        raise RuntimeError("stores failed")

    client.on_close(failing_hook)
    monkeypatch.setattr(client.backend, "close_stores", failing_stores)
    with pytest.raises(RuntimeError, match="stores failed"):
        client.close()
    assert recorder.calls == ["hook", "stores", "scheduler", "connection"]


def test_close_is_idempotent(client: dcoord.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(client, monkeypatch)
    client.on_close(lambda: recorder.record("hook"))
    client.close()
    client.close()
    assert recorder.calls == ["hook", "stores", "scheduler", "connection"]
    with pytest.raises(dcoord.ClientClosed):
        client.lock("x")


def test_concurrent_closes_close_once(
    client: dcoord.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(client, monkeypatch)
    client.on_close(lambda: recorder.record("hook"))
    start = threading.Barrier(CLOSERS)
    errors: list[BaseException] = []

    def close() -> None:
        try:
            start.wait(timeout=30)
            client.close()
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=close) for _ in range(CLOSERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert not any(thread.is_alive() for thread in threads)
    assert recorder.calls == ["hook", "stores", "scheduler", "connection"]
