"""etcd only, async API: an acquire returns by its deadline while the server hangs, and
an acquire still waiting when its client closes ends with ClientClosed, its queue key
revoked by the close (real etcd servers, paused with SIGSTOP where a test says so).

Before these tests, a timed-out async waiter awaited the revoke of its lease (retried
until the server answered), and the close of a client did not stop an acquire waiting
in another task: it carried on over the closed gRPC channels, where every request,
the revoke of its cleanup included, raised gRPC's UsageError.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

import dcoord
from dcoord.aio import connect
from tests.aio.test_aio_locks import eventually, waiters
from tests.conformance.test_etcd_deadlines import BOUND, REQUEST_TIMEOUT, TIMEOUT
from tests.conformance.test_etcd_leases import lock_keys
from tests.conformance.test_locks import stored_keys, wait_until
from tests.servers import Server


def test_an_async_waiter_times_out_on_time_while_the_server_hangs(
    server_factory: Callable[..., Server], namespace: str
) -> None:
    server = server_factory("etcd")
    sync = dcoord.connect(server.url, namespace=namespace)

    async def main() -> None:
        async with connect(
            server.url, namespace=namespace, request_timeout=REQUEST_TIMEOUT
        ) as client:
            waiter = client.lock("res", ttl=30)
            started = time.monotonic()
            waiting = asyncio.create_task(waiter.acquire(timeout=TIMEOUT))
            assert await eventually(lambda: len(lock_keys(sync, "res")) == 2), "it queued"
            server.pause()
            try:
                acquired = await asyncio.wait_for(waiting, TIMEOUT + REQUEST_TIMEOUT + 5)
                took = time.monotonic() - started
            finally:
                server.resume()
            assert acquired is False
            assert took < TIMEOUT + BOUND, took

    try:
        assert sync.lock("res", ttl=30).acquire()
        before = stored_keys(sync)
        asyncio.run(main())
        assert wait_until(lambda: stored_keys(sync) == before, 5), stored_keys(sync)
    finally:
        server.resume()
        sync.close()


def test_an_async_acquire_started_on_a_hung_server_returns_by_its_deadline(
    server_factory: Callable[..., Server], namespace: str
) -> None:
    server = server_factory("etcd")

    async def main() -> None:
        async with connect(
            server.url, namespace=namespace, request_timeout=REQUEST_TIMEOUT
        ) as client:
            server.pause()
            try:
                started = time.monotonic()
                acquired = await client.lock("res", ttl=30).acquire(timeout=TIMEOUT)
                took = time.monotonic() - started
            finally:
                server.resume()
            assert acquired is False
            assert took < TIMEOUT + BOUND, took
            assert await client.lock("res", ttl=30).acquire(timeout=5), "nothing blocks it"

    try:
        asyncio.run(main())
    finally:
        server.resume()


@pytest.mark.parametrize("backend", ["etcd"], indirect=True)
def test_an_async_acquire_waiting_at_close_ends_with_client_closed_and_no_key(
    aio_url: str, namespace: str
) -> None:
    with dcoord.connect(aio_url, namespace=namespace) as sync:
        holder = sync.lock("res", ttl=30)
        assert holder.acquire()
        before = stored_keys(sync)

        async def main() -> None:
            client = await connect(aio_url, namespace=namespace)
            # A keep-alive (its next request) within a second of the close.
            waiting = asyncio.create_task(client.lock("res", ttl=3).acquire(timeout=60))
            assert await eventually(lambda: waiters(client, "res", sync) == 1)
            await client.close()
            # Revoked by the close, not left to its lease's TTL.
            assert stored_keys(sync) == before
            with pytest.raises(dcoord.ClientClosed):
                await asyncio.wait_for(waiting, 10)

        asyncio.run(main())
        assert stored_keys(sync) == before
        holder.release()
