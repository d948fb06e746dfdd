"""etcd only, async API: the locks of a client share its lease per TTL, as the sync
client's do (tests/conformance/test_etcd_leases.py), with one keep-alive task per lease.

A lost shared lease loses every lock on it (each ``on_lost`` runs); a timed-out or
cancelled waiter's key is deleted and the shared lease stays for the other keys; a lock
without auto-renewal keeps a lease of its own, which expires by its TTL. Real etcd
servers; a keep-alive that fails is the client's own request, made to fail in the test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

import dcoord
from dcoord.aio import AsyncClient, AsyncLock, connect
from dcoord.backends.etcd.aio_locks import AsyncEtcdBackend
from dcoord.errors import BackendUnavailable
from tests.aio.test_aio_locks import MARGIN, eventually
from tests.conformance.test_etcd_leases import lock_keys
from tests.conformance.test_locks import stored_keys

pytestmark = pytest.mark.parametrize("backend", ["etcd"], indirect=True)


@pytest.fixture
def sync(aio_url: str, namespace: str) -> Iterator[dcoord.Client]:
    """A sync client of the namespace, to read the keys and leases on the server."""
    with dcoord.connect(aio_url, namespace=namespace) as client:
        yield client


def etcd_backend(client: AsyncClient) -> AsyncEtcdBackend:
    backend = client.backend
    assert isinstance(backend, AsyncEtcdBackend)
    return backend


def lease_of(sync: dcoord.Client, name: str) -> int:
    """The lease of the (only) queue key of lock ``name``."""
    keys = lock_keys(sync, name)
    assert len(keys) == 1, keys
    return keys[0][1]


def keepers() -> set[str]:
    """The names of the running lease keep-alive tasks."""
    return {t.get_name() for t in asyncio.all_tasks() if "keep-alive" in t.get_name()}


def test_locks_of_one_ttl_share_one_lease_with_one_keep_alive_task(
    aio_url: str, namespace: str, sync: dcoord.Client
) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            locks = [client.lock(f"l{i}", ttl=3) for i in range(20)]
            permit = client.semaphore("sem", 2, ttl=3)
            for lock in [*locks, permit]:
                assert await lock.acquire(timeout=5)
            leases = {lease_of(sync, f"l{i}") for i in range(20)}
            assert len(leases) == 1, f"one lease for 20 locks of one TTL, not {len(leases)}"
            (shared,) = leases
            permit_keys = sync.backend.etcd.get_prefix(  # type: ignore[attr-defined]
                f"{sync.backend.prefix}sem/sem/"  # type: ignore[attr-defined]
            )
            assert {meta.lease_id for _, meta in permit_keys} == {shared}
            # Another TTL: another lease (negative control of the sharing), its own task.
            other = client.lock("other", ttl=30)
            assert await other.acquire()
            assert lease_of(sync, "other") != shared
            assert len(keepers()) == 2, keepers()
            # The keep-alives of the 20 locks (and the permit) are one request per third of
            # the lease's TTL, not one per lock: count them over two TTLs.
            locks_store = etcd_backend(client).locks
            sent: list[int] = []
            real = locks_store.keep_alive

            async def counted(lease: int, *, timeout: float | None = None) -> int:
                sent.append(lease)
                return await real(lease, timeout=timeout)

            locks_store.keep_alive = counted  # type: ignore[method-assign]
            await asyncio.sleep(6)
            assert all(lock.held for lock in [*locks, permit])
            assert 3 <= sent.count(shared) <= 8, sent
            # Renewals send nothing of their own: only the shared lease's keep-alives.
            assert set(sent) <= {shared, lease_of(sync, "other")}, sent

    asyncio.run(main())


def test_a_lost_shared_lease_loses_every_lock_on_it(
    aio_url: str, namespace: str, sync: dcoord.Client
) -> None:
    ttl = 2.0

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            lost: list[str] = []

            async def on_lost(lock: AsyncLock) -> None:
                lost.append(lock.name)

            locks = [client.lock(f"l{i}", ttl=ttl, on_lost=on_lost) for i in range(3)]
            for lock in locks:
                assert await lock.acquire()
            lease = lease_of(sync, "l0")
            sync.backend.etcd.revoke_lease(lease)  # type: ignore[attr-defined]
            # The lease's keep-alive finds it gone (a third of its TTL at most), and each
            # lock sees it at its next renewal.
            assert await eventually(lambda: len(lost) == 3, ttl + 2 * MARGIN), lost
            assert sorted(lost) == ["l0", "l1", "l2"]
            assert not any(lock.held for lock in locks)
            # A new acquire queues on a fresh shared lease.
            again = client.lock("l0", ttl=ttl)
            assert await again.acquire(timeout=5)
            assert lease_of(sync, "l0") != lease
            await again.release()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["lock", "semaphore"])
def test_an_acquire_queues_again_on_a_fresh_lease_when_the_shared_one_is_gone(
    aio_url: str, namespace: str, sync: dcoord.Client, kind: str
) -> None:
    """The server dropped the shared lease before its keep-alive (every 10 s here)
    noticed: the put on it fails, writing nothing, and the acquire queues once more on a
    fresh lease; the lock on the dropped lease is lost."""

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            first = client.lock("first", ttl=30)
            assert await first.acquire()
            lease = lease_of(sync, "first")
            sync.backend.etcd.revoke_lease(lease)  # type: ignore[attr-defined]
            if kind == "lock":
                handle = client.lock("second", ttl=30)
            else:
                handle = client.semaphore("sem", 2, ttl=30)
            assert await handle.acquire(timeout=5)
            assert handle._slot._lease.id != lease  # type: ignore[attr-defined]
            with pytest.raises(dcoord.LockNotOwned):
                await first.extend()
            await handle.release()

    asyncio.run(main())


def test_a_lease_not_refreshed_within_its_ttl_loses_its_locks_and_is_revoked(
    aio_url: str, namespace: str, sync: dcoord.Client
) -> None:
    """Keep-alives that fail for longer than the TTL: the lease is presumed expired (its
    locks lost at its deadline), and revoked once the server answers again."""
    ttl = 2.0

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            lost: list[str] = []
            locks = [
                client.lock(f"l{i}", ttl=ttl, on_lost=lambda lock: lost.append(lock.name))
                for i in range(2)
            ]
            for lock in locks:
                assert await lock.acquire()
            lease = lease_of(sync, "l0")
            store = etcd_backend(client).locks
            real = store.keep_alive
            failing = True

            async def keep_alive(lease_id: int, *, timeout: float | None = None) -> int:
                if failing and lease_id == lease:
                    raise BackendUnavailable(f"keep lease {lease_id:x} alive: no answer (test)")
                return await real(lease_id, timeout=timeout)

            store.keep_alive = keep_alive  # type: ignore[method-assign]
            assert await eventually(lambda: len(lost) == 2, ttl + 2 * MARGIN), lost
            failing = False
            # Given up, and revoked: its keys do not wait for the server's expiry.
            assert await eventually(lambda: not lock_keys(sync, "l0") and not lock_keys(sync, "l1"))
            fresh = client.lock("l1", ttl=ttl)
            assert await fresh.acquire(timeout=5)
            assert lease_of(sync, "l1") != lease

    asyncio.run(main())


@pytest.mark.parametrize("style", ["cancel", "timeout"])
def test_a_waiter_that_gives_up_deletes_its_key_and_keeps_the_shared_lease(
    aio_url: str, namespace: str, sync: dcoord.Client, style: str
) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            holder = sync.lock("res", ttl=30)
            assert holder.acquire()
            mine = client.lock("mine", ttl=30)
            assert await mine.acquire()
            shared = lease_of(sync, "mine")
            before = stored_keys(sync)
            waiter = client.lock("res", ttl=30)
            if style == "cancel":
                task = asyncio.create_task(waiter.acquire(timeout=60))
                assert await eventually(lambda: len(lock_keys(sync, "res")) == 2)
                # It queues on the client's shared lease, not on one of its own.
                assert lock_keys(sync, "res")[1][1] == shared
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                assert await waiter.acquire(timeout=0.5) is False
            # No key left (at once: deleted before the acquire returned) ...
            assert stored_keys(sync) == before
            # ... and the shared lease, with the other lock's key on it, is still there.
            await asyncio.sleep(0.5)
            assert mine.held and lease_of(sync, "mine") == shared
            await mine.extend()
            holder.release()
            await mine.release()
            assert not lock_keys(sync, "mine"), "release deletes the key"

    asyncio.run(main())


def test_a_lock_without_auto_renewal_has_its_own_lease_and_expires_by_its_ttl(
    aio_url: str, namespace: str, sync: dcoord.Client
) -> None:
    ttl = 2.0

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            renewed = client.lock("renewed", ttl=ttl)
            assert await renewed.acquire()
            once = client.lock("once", ttl=ttl, auto_renew=False)
            assert await once.acquire()
            assert lease_of(sync, "once") != lease_of(sync, "renewed")
            started = time.monotonic()
            # Nobody keeps its lease alive: another client gets it within the TTL.
            assert await asyncio.to_thread(sync.lock("once", ttl=ttl).acquire, timeout=ttl + 5)
            assert time.monotonic() - started < ttl + MARGIN * 2
            assert renewed.held, "the shared lease is kept alive all along"

    asyncio.run(main())


def test_close_revokes_the_shared_leases(aio_url: str, namespace: str, sync: dcoord.Client) -> None:
    async def main() -> None:
        before = stored_keys(sync)
        client = await connect(aio_url, namespace=namespace)
        election = client.election("e")
        lead: Any = await election.campaign("me", ttl=30)
        assert lead is not None
        candidate_lease = lead._slot._lease.id
        lock = client.lock("l", ttl=30)
        assert await lock.acquire()
        assert lease_of(sync, "l") == candidate_lease, "a campaign shares the lock's lease"
        await client.close()
        assert stored_keys(sync) == before
        assert not keepers(), "the keep-alive task ends with the client"
        info = sync.backend.etcd.get_lease_info(candidate_lease)  # type: ignore[attr-defined]
        assert info.TTL == -1, "revoked by the close"

    asyncio.run(main())
