"""The async API on every topology: what the conformance run under
``DCOORD_TEST_TOPOLOGY=sentinel|cluster|etcd3`` found, pinned by tests of their own.

The whole of tests/aio runs on each topology (backends/run-tests.sh); the tests here
check, without a topology or with one started here, what made that run fail.
"""

from __future__ import annotations

import asyncio

import pytest

from dcoord.backends.redis.aio_locks import AsyncRedisBackend
from dcoord.config import settings_from


async def swallows_cancellation() -> str:
    """What ``asyncio.wait_for`` does on Python 3.11 when its inner call completes in
    the step its caller is cancelled: return the result, drop the cancellation."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        return "reply"
    return "no cancel"


def test_a_cancellation_lost_inside_redis_py_still_cancels_the_call() -> None:
    # Found on a Cluster: a waiter cancelled during its SSUBSCRIBE went on waiting
    # (tests/aio/test_aio_locks.py::test_a_cancelled_acquire_leaves_nothing_behind).
    async def main() -> None:
        backend = AsyncRedisBackend(settings_from("redis://127.0.0.1:1"))
        try:
            entered = asyncio.Event()

            async def fn() -> str:
                entered.set()
                return await swallows_cancellation()

            task = asyncio.create_task(backend.call(fn, what="a call"))
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

            # Negative control: a task already cancelling (releasing on its way out of
            # ``async with``) still gets the replies of its calls.
            async def cleanup_after_cancel() -> str:
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    return await backend.call(lambda: asyncio.sleep(0, "released"), what="x")
                return "not cancelled"

            cleanup = asyncio.create_task(cleanup_after_cancel())
            await asyncio.sleep(0)
            cleanup.cancel()
            assert await cleanup == "released"
        finally:
            await backend.close()

    asyncio.run(main())
