"""The async Redis lock scripts' direct path (dcoord.backends.redis.aio_locks.execute):
redis-py's connection rules kept without its per-command bookkeeping."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis

import dcoord.aio
from dcoord.backends.redis.aio_locks import execute
from tests.conftest import Servers, topology

pytestmark = pytest.mark.skipif(
    topology() == "cluster", reason="a Cluster's scripts go through its own client"
)


@pytest.fixture
def redis_url(servers: Servers, namespace: str) -> str:
    return servers.confined_url("redis", namespace)


async def poll(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.02)
    return bool(await predicate())


def test_a_cancelled_read_closes_its_connection_so_no_stale_reply_is_read(
    redis_url: str, namespace: str
) -> None:
    async def main() -> None:
        async with (
            dcoord.aio.connect(redis_url, namespace=namespace) as client,
            dcoord.aio.connect(redis_url, namespace=namespace) as second,
        ):
            mine: Any = client.backend.redis
            other: Any = second.backend.redis
            key = f"dcoord:{namespace}:execute-test"
            blocked = asyncio.create_task(execute(mine, "BLPOP", key, 0))

            async def waiting() -> bool:
                clients = await other.client_list()
                return any(c.get("cmd") == "blpop" for c in clients)

            assert await poll(waiting)
            blocked.cancel()
            with pytest.raises(asyncio.CancelledError):
                await blocked
            # The reply the cancelled read never took arrives now: a connection
            # reused after the cancel would hand it to the next command.
            await other.rpush(key, "stale")
            assert await execute(mine, "GET", f"{key}:absent") is None
            assert await execute(mine, "PING") == b"PONG"

    asyncio.run(main())


def test_an_error_reply_keeps_the_connection_in_order_and_scripts_reload(
    redis_url: str, namespace: str
) -> None:
    async def main() -> None:
        async with dcoord.aio.connect(redis_url, namespace=namespace) as client:
            mine: Any = client.backend.redis
            with pytest.raises(redis.exceptions.NoScriptError):
                await execute(mine, "EVALSHA", "0" * 40, 0)
            assert await execute(mine, "PING") == b"PONG"
            # After SCRIPT FLUSH the lock scripts load again on NOSCRIPT.
            lock = client.lock("reload", ttl=10)
            assert await lock.acquire(timeout=5)
            await mine.script_flush()
            await lock.release()
            assert await lock.acquire(timeout=5)
            await lock.release()

    asyncio.run(main())
