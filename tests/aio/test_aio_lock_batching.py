"""Async lock extends share round trips (issue 16): extends queued while the client's
senders are busy go out together in one pipeline, each still its own owner-checked
script with its own answer. Round trips are counted by the server (``INFO``
``total_reads_processed``), never by MONITOR."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

import dcoord
from dcoord.aio import AsyncClient, AsyncLock, connect
from dcoord.backends.base import LockGrant

pytestmark = pytest.mark.parametrize("real_backend", ["redis"], indirect=True)


def reads(url: str) -> int:
    """Requests the server has read so far (this INFO's own included)."""
    with dcoord.connect(url) as client:
        info: Any = client.backend.redis.info("stats")  # type: ignore[attr-defined]
    return int(info["total_reads_processed"])


async def held_locks(url: str, namespace: str, n: int) -> tuple[AsyncClient, list[AsyncLock]]:
    client = await connect(url, namespace=namespace)
    if client.backend.locks.extends is None:  # type: ignore[attr-defined]
        await client.close()
        pytest.skip("a Redis Cluster extends its locks one by one")
    locks = [client.lock(f"res{i}", ttl=60) for i in range(n)]
    for lock in locks:
        assert await lock.acquire(timeout=0)
    return client, locks


def test_extends_queued_together_are_one_round_trip(real_backend_url: str, namespace: str) -> None:
    async def main() -> tuple[int, int]:
        client, locks = await held_locks(real_backend_url, namespace, 50)
        try:
            slots: list[Any] = [lock._slot for lock in locks]
            await slots[0].extend(60.0)  # the script is loaded, a connection open
            before = await asyncio.to_thread(reads, real_backend_url)
            answers = await asyncio.gather(*(slot.extend(60.0) for slot in slots))
            together = await asyncio.to_thread(reads, real_backend_url) - before
            assert all(isinstance(answer, LockGrant) for answer in answers)
            # Negative control: one at a time, each extend is a round trip of its own.
            before = await asyncio.to_thread(reads, real_backend_url)
            for slot in slots:
                assert await slot.extend(60.0) is not None
            alone = await asyncio.to_thread(reads, real_backend_url) - before
            return together, alone
        finally:
            await client.close()

    together, alone = asyncio.run(main())
    # Besides the INFO connection's (connect, HELLO/SETINFO, INFO: a few reads), one read
    # for the pipeline, a second if the kernel split it.
    assert together <= alone - 45, (together, alone)
    assert alone >= 50


def test_a_batch_answers_each_extend_for_its_own_lock(
    real_backend_url: str, namespace: str
) -> None:
    """One lock of the batch is gone (a failover ate it), one has a key of the wrong
    type (an error reply): those two, and only they, answer so; the rest are extended."""

    async def main() -> None:
        client, locks = await held_locks(real_backend_url, namespace, 20)
        try:
            slots: list[Any] = [lock._slot for lock in locks]
            gone, broken = slots[5], slots[12]
            raw = redis.Redis.from_url(real_backend_url.split("?")[0])
            try:
                raw.delete(gone.key, broken.key)
                raw.hset(broken.key, "not", "a lock")
                answers = await asyncio.gather(
                    *(slot.extend(60.0) for slot in slots), return_exceptions=True
                )
                raw.delete(broken.key)
            finally:
                raw.close()
            assert answers[5] is None
            assert isinstance(answers[12], dcoord.DcoordError), answers[12]
            assert "res12" in str(answers[12])
            others = [a for i, a in enumerate(answers) if i not in (5, 12)]
            assert all(isinstance(answer, LockGrant) for answer in others), others
        finally:
            await client.close()

    asyncio.run(main())
