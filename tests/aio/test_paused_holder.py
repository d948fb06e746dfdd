"""A paused async holder is fenced off (real processes, real servers).

An async holder process (dcoord.aio) takes a lock and writes through its fence; it is
paused (SIGSTOP) past the TTL; a sync client takes the lock with a higher fence and
writes; resumed, the async holder knows it lost the lock and the fence refuses its
write. Negative control: the same stale token still writes where no newer fence was
admitted, so it is the successor's fence, not a broken client, that stops it.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import dcoord
from tests.faults.child import DrivenChild

ROOT = Path(__file__).resolve().parents[2]
TTL = 2.0
VALUE = "{res}value"  # in the fence's slot (Redis Cluster)

HOLDER = """
import asyncio, sys
import dcoord.aio

async def main(url, namespace, ttl):
    async with dcoord.aio.connect(url, namespace=namespace) as client:
        lock = client.lock("res", ttl=ttl, on_lost=lambda _: print("LOST", flush=True))
        assert await lock.acquire(timeout=60)
        print("ACQUIRED", lock.fence, flush=True)
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        while line := (await stdin.readline()).decode().strip():
            resource = "res" if line == "write" else "other"
            key = "{res}value" if line == "write" else "{other}value"
            wrote = await client.fence(resource).write(lock.fence, key, str(lock.fence).encode())
            print(f"WROTE {wrote} held={lock.held}", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


@pytest.fixture
def holder(aio_url: str, namespace: str, tmp_path: Path) -> Iterator[DrivenChild]:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    child = DrivenChild(
        [sys.executable, str(script), aio_url, namespace, str(TTL)], cwd=ROOT, kind="holder"
    )
    yield child
    child.stop()


@pytest.mark.parametrize("backend", ["redis", "etcd"], indirect=True)
def test_a_paused_async_holder_is_fenced_off(
    holder: DrivenChild, aio_url: str, namespace: str
) -> None:
    stale_fence = int(holder.expect("ACQUIRED").split()[1])
    holder.send("write")
    assert holder.expect("WROTE") == "WROTE True held=True"

    holder.signal(signal.SIGSTOP)
    paused_at = time.monotonic()
    with dcoord.connect(aio_url, namespace=namespace) as successor:
        lock = successor.lock("res", ttl=30)
        assert lock.acquire(timeout=TTL + 10)
        assert time.monotonic() - paused_at >= TTL * 0.5, "the lock was taken before its TTL"
        assert lock.fence > stale_fence
        assert successor.fence("res").write(lock.fence, VALUE, b"successor")

        assert not holder.lost, "the holder lost the lock before it was paused"
        holder.signal(signal.SIGCONT)
        holder.send("write")
        # Resumed, it knows it lost the lock, and the fence refuses the stale token.
        assert holder.expect("WROTE") == "WROTE False held=False"
        if not holder.lost:
            assert holder.expect("LOST", timeout=TTL + 5) == "LOST"
        assert successor.backend.kv.get(VALUE) == b"successor"  # type: ignore[attr-defined]

        # Negative control: the same stale token on a resource nobody fenced since.
        holder.send("write-other")
        assert holder.expect("WROTE") == "WROTE True held=False"
        lock.release()
