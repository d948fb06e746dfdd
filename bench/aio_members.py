"""Async etcd members at scale: the leases, keep-alives and joins of one client's members,
and the expiry of a killed process's.

    python -m bench.aio_members [URL] [--members 1000] [--ttl 5] [--window 10] [--killed 100]

Without a URL it starts an etcd process (tests.servers) and stops it by its PID at the
end. One run:

1. One async client joins ``--members`` members (ttl ``--ttl``) one after the other, then
   as many more at once (``asyncio.gather``): joins per second of each. Reported: the
   leases the members' keys are on (read from the server), the lease keep-alive requests
   the client sends per second over ``--window`` seconds (counted at its lock store's
   ``keep_alive``, where every lease keep-alive of the client goes), its heart-beat
   tasks (none since they are told of their lease's loss by its keep-alive task), and
   the CPU the process spends meanwhile (%, of one core: keeping the members alive,
   nothing else runs). Then the members' lease is revoked and the keep-alive request
   that finds it gone is sent at once: seconds until every member is lost (``told``).
2. Expiry: a child process joins ``--killed`` async members (ttl ``--ttl``) and is
   SIGKILLed; a live ring in this process follows the group. Reported: seconds from the
   kill until the ring has dropped them all, the views a watch of the group got
   meanwhile (a slow reader gets only the newest), and the etcd revisions their expiry
   took (the group's epoch advanced by; nothing else writes to the server).

To compare with another version of dcoord, run it with that version first on the path,
from another directory: ``cd /tmp && PYTHONPATH=/path/to/old:/path/to/this python -m
bench.aio_members``. The machine these were taken on is shared: run it twice.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

from pyetcd import etcdrpc
from pyetcd.utils import prefix_range_end

import dcoord
from dcoord.aio import AsyncClient, AsyncJoinedMember, connect


async def lease_count(client: AsyncClient, group: str) -> int:
    """The distinct leases the keys of ``group``'s members are on."""
    backend: Any = client.backend
    prefix = f"{backend.prefix}groups/{group}/members/".encode()
    reply = await backend.kv.Range(
        etcdrpc.RangeRequest(key=prefix, range_end=prefix_range_end(prefix)),
        metadata=backend.metadata,
    )
    return len({kv.lease for kv in reply.kvs})


async def members_run(url: str, n: int, ttl: float, window: float) -> None:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    async with connect(url, namespace=namespace) as client:
        group = client.group("g")
        started = time.perf_counter()
        members = [await group.join(f"s{i}", ttl=ttl) for i in range(n)]
        sequential = n / (time.perf_counter() - started)
        started = time.perf_counter()
        members += await asyncio.gather(*(group.join(f"c{i}", ttl=ttl) for i in range(n)))
        gathered = n / (time.perf_counter() - started)
        store: Any = client.backend.locks
        real = store.keep_alive
        sent = 0

        async def counted(lease: int, **options: Any) -> int:
            nonlocal sent
            sent += 1
            return await real(lease, **options)

        store.keep_alive = counted
        cpu = time.process_time()
        await asyncio.sleep(window)
        cpu = (time.process_time() - cpu) / window
        store.keep_alive = real
        beats = sum(1 for t in asyncio.all_tasks() if t.get_name().startswith("dcoord heart"))
        leases = await lease_count(client, "g")
        told = await lost_after_revoke(client, members)
        print(
            f"   {2 * n:>7}{ttl:>6g}{sequential:>12.0f}{gathered:>12.0f}{leases:>8}"
            f"{sent / window:>14.1f}{beats:>12}{cpu * 100:>10.1f}{told:>8.2f}"
        )


async def lost_after_revoke(client: AsyncClient, members: list[AsyncJoinedMember]) -> float:
    """Revoke the members' (shared) lease and send the keep-alive that finds it gone, as
    its keep-alive task would at its next due time: seconds until every member is lost."""
    store: Any = client.backend.locks
    registration: Any = members[0]._reg
    lease = registration.lease
    started = time.perf_counter()
    await store.revoke(lease.id)
    await store.leases.keep_alive(lease)
    while not all(m.lost_reason for m in members):
        await asyncio.sleep(0.01)
    return time.perf_counter() - started


async def child(url: str, namespace: str, count: int, ttl: float) -> None:
    """Join ``count`` members, say ``ready``, and stay until stdin closes or SIGKILL."""
    async with connect(url, namespace=namespace) as client:
        group = client.group("g")
        await asyncio.gather(*(group.join(f"k{i}", ttl=ttl) for i in range(count)))
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.read)


async def expiry_run(url: str, killed: int, ttl: float) -> None:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-m", "bench.aio_members", url, "--child", namespace]
    proc = subprocess.Popen(
        [*command, str(killed), str(ttl)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        ready = await asyncio.to_thread(proc.stdout.readline)
        assert ready == "ready\n", ready
        async with connect(url, namespace=namespace) as observer:
            ring = await observer.group("g").ring()
            assert await ring.wait_for(lambda r: len(r) == killed, 60), len(ring)
            views = observer.group("g").watch()
            assert len(await anext(views)) == killed
            updates = 0

            async def follow() -> None:
                nonlocal updates
                async for view in views:
                    updates += 1
                    if not view:
                        return

            follower = asyncio.create_task(follow())
            epoch = ring.epoch
            killed_at = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            assert await ring.wait_for(lambda r: len(r) == 0, ttl + 60), "not dropped"
            gone = time.monotonic() - killed_at
            await asyncio.wait_for(follower, 10)
            print(f"   {killed:>7}{ttl:>6g}{gone:>10.2f}{updates:>9}{ring.epoch - epoch:>11}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", nargs="?", help="an etcd URL (default: start an etcd process)")
    ap.add_argument("--members", type=int, default=1000, help="joined one by one, then at once")
    ap.add_argument("--ttl", type=float, default=5.0, help="the members' ttl")
    ap.add_argument("--window", type=float, default=10.0, help="seconds keep-alives are counted")
    ap.add_argument("--killed", type=int, default=100, help="members of the killed process")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        namespace, count, ttl = args.child
        asyncio.run(child(args.url, namespace, int(count), float(ttl)))
        return 0
    server = None
    url = args.url
    if url is None:
        from tests.servers import start_server

        server = start_server("etcd", using="processes", persistent=False)
        url = server.url
    try:
        print(f"dcoord from {os.path.dirname(dcoord.__file__)}, load {os.getloadavg()[0]:.2f}")
        print("1. one async client's members")
        print(
            f"   {'members':>7}{'ttl':>6}{'joins/s seq':>12}{'joins/s all':>12}{'leases':>8}"
            f"{'keep-alives/s':>14}{'heart-beats':>12}{'idle cpu':>10}{'told':>8}"
        )
        asyncio.run(members_run(url, args.members, args.ttl, args.window))
        print("2. expiry of a SIGKILLed process's members, seen by a live ring")
        print(f"   {'killed':>7}{'ttl':>6}{'all gone':>10}{'views':>9}{'revisions':>11}")
        asyncio.run(expiry_run(url, args.killed, args.ttl))
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
