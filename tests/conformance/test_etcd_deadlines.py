"""etcd only: ``acquire(timeout=T)`` returns by T (plus a small bound) while the server
hangs, and what the attempt left in the queue is removed once the server is back.

The server is a real etcd, paused (SIGSTOP) at the moment under test. Before these
tests, a timed-out waiter deleted its queue key synchronously (up to the request
timeout on a hung server), and the first requests of an acquire (lease grant, enqueue)
ran for the request timeout whatever the acquire's deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import dcoord
from tests.conformance.test_etcd_leases import lock_keys
from tests.conformance.test_locks import stored_keys, wait_until
from tests.servers import Server

TIMEOUT = 1.5
# What an acquire may take past its deadline: the last request (0.1 s), the first
# attempt at removing its key (0.1 s), and slack for a loaded machine.
BOUND = 0.6
# Long against TIMEOUT: an acquire bounded by the request timeout cannot pass.
REQUEST_TIMEOUT = 4


def test_a_waiter_times_out_on_time_while_the_server_hangs(
    server_factory: Callable[..., Server], namespace: str
) -> None:
    server = server_factory("etcd")
    a = dcoord.connect(server.url, namespace=namespace)
    b = dcoord.connect(server.url, namespace=namespace, request_timeout=REQUEST_TIMEOUT)
    try:
        assert a.lock("res", ttl=30).acquire()
        before = stored_keys(a)
        waiter = b.lock("res", ttl=30)
        outcome: dict[str, object] = {}

        def wait() -> None:
            started = time.monotonic()
            try:
                outcome["acquired"] = waiter.acquire(timeout=TIMEOUT)
            except BaseException as exc:
                outcome["error"] = exc
            outcome["took"] = time.monotonic() - started

        thread = threading.Thread(target=wait)
        thread.start()
        assert wait_until(lambda: len(lock_keys(a, "res")) == 2, 5), "the waiter queued"
        server.pause()
        try:
            thread.join(TIMEOUT + REQUEST_TIMEOUT + 5)
        finally:
            server.resume()
        assert "error" not in outcome, outcome
        assert outcome["acquired"] is False
        took = outcome["took"]
        assert isinstance(took, float) and took < TIMEOUT + BOUND, outcome
        # Removed in the background once the server answers again.
        assert wait_until(lambda: stored_keys(a) == before, 5), stored_keys(a)
    finally:
        server.resume()
        a.close()
        b.close()


def test_an_acquire_started_on_a_hung_server_returns_by_its_deadline(
    server_factory: Callable[..., Server], namespace: str
) -> None:
    server = server_factory("etcd")
    client = dcoord.connect(server.url, namespace=namespace, request_timeout=REQUEST_TIMEOUT)
    try:
        # The shared lease of this TTL exists: the acquire's first request is its put,
        # which may reach the server (when it resumes) after the acquire gave up.
        warm = client.lock("warm", ttl=30)
        assert warm.acquire()
        warm.release()
        before = stored_keys(client)
        server.pause()
        try:
            started = time.monotonic()
            acquired = client.lock("res", ttl=30).acquire(timeout=TIMEOUT)
            took = time.monotonic() - started
        finally:
            server.resume()
        assert acquired is False
        assert took < TIMEOUT + BOUND, took
        # A key whose creation is unknown is removed all the same.
        assert wait_until(lambda: stored_keys(client) == before, 5), stored_keys(client)
        assert client.lock("res", ttl=30).acquire(timeout=5), "nothing blocks the lock"
    finally:
        server.resume()
        client.close()
