"""etcd only, async API: the members one client joins share its lease per TTL, as the
sync client's do (and as its async locks do: tests/aio/test_etcd_leases.py).

One lease and one keep-alive task per TTL, whatever the number of members; a member's
leave deletes its key only (the lease lives on for the others); a lost lease loses every
member on it, each told (``on_lost``), and their keys go in one revision; a join on a
lease the server dropped unnoticed joins on a fresh one; a join that fails after its put
leaves no key. Real etcd servers; leases are counted with etcd's LeaseLeases API
(``etcdctl lease list``) on a server of the test's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dcoord
from dcoord.aio import AsyncJoinedMember, connect
from dcoord.errors import BackendUnavailable
from tests.aio.test_aio_locks import MARGIN, eventually
from tests.aio.test_etcd_leases import etcd_backend, keepers
from tests.servers import Server

# The tests on the session's etcd (the first one has a server of its own).
etcd = pytest.mark.parametrize("backend", ["etcd"], indirect=True)


@pytest.fixture
def sync(aio_url: str, namespace: str) -> Iterator[dcoord.Client]:
    """A sync client of the namespace, to read the member keys and revoke leases."""
    with dcoord.connect(aio_url, namespace=namespace) as client:
        yield client


def member_leases(sync: dcoord.Client, group: str) -> dict[str, int]:
    """Member id -> the lease its key is on, read from the server."""
    backend: Any = sync.backend
    prefix = f"{backend.prefix}groups/{group}/members/"
    return {
        meta.key.decode()[len(prefix) :]: meta.lease_id
        for _, meta in backend.etcd.get_prefix(prefix)
    }


def lease_ids(server: Server) -> set[str]:
    """The leases the server has now (etcd's LeaseLeases, through etcdctl)."""
    lines = server.etcdctl("lease", "list").splitlines()  # "found N leases", then the ids
    return {line.strip() for line in lines[1:] if line.strip()}


def test_members_of_one_client_and_ttl_share_one_lease_and_one_keep_alive(
    server_factory: Callable[..., Server], namespace: str
) -> None:
    server = server_factory("etcd")

    async def main() -> None:
        async with connect(server.url, namespace=namespace) as client:
            before = lease_ids(server)
            group = client.group("g")
            members = [await group.join(f"m{i}", ttl=5) for i in range(20)]
            new = lease_ids(server) - before
            assert len(new) == 1, f"20 members of one TTL are on {len(new)} leases, not 1"
            # One keep-alive task for them all (and no heart-beat task of their own).
            assert len(keepers()) == 1, keepers()
            # Another TTL: another lease (negative control of the sharing).
            other = await group.join("other", ttl=30)
            assert len(lease_ids(server) - before) == 2
            assert all(m.alive for m in [*members, other])
            await client.close()
            assert lease_ids(server) == before, "close revokes the shared leases"

    asyncio.run(main())


@etcd
def test_a_member_leaving_deletes_its_key_only_and_keeps_the_lease(
    aio_url: str, namespace: str, sync: dcoord.Client
) -> None:
    ttl = 2.0

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            group = client.group("g")
            members = [await group.join(f"m{i}", ttl=ttl) for i in range(3)]
            (lease,) = set(member_leases(sync, "g").values())
            await members[0].leave()
            assert member_leases(sync, "g") == {"m1": lease, "m2": lease}
            # The lease lives on, kept alive, past its TTL: the others stay.
            await asyncio.sleep(ttl + MARGIN)
            assert member_leases(sync, "g") == {"m1": lease, "m2": lease}
            assert members[1].alive and members[2].alive
            assert set(await asyncio.to_thread(sync.group("g").members)) == {"m1", "m2"}
            # The one that left can join again, on the same shared lease.
            await group.join("m0", ttl=ttl)
            assert member_leases(sync, "g")["m0"] == lease

    asyncio.run(main())


@etcd
def test_a_revoked_shared_lease_loses_every_member_on_it_in_one_change(
    aio_url: str, namespace: str, sync: dcoord.Client
) -> None:
    ttl = 3.0

    async def main() -> None:
        async with (
            connect(aio_url, namespace=namespace) as client,
            connect(aio_url, namespace=namespace) as observer,
        ):
            lost: list[tuple[str, str | None]] = []

            def on_lost(member: AsyncJoinedMember) -> None:
                lost.append((member.id, member.lost_reason))

            members = [
                await client.group("g").join(f"m{i}", ttl=ttl, on_lost=on_lost) for i in range(5)
            ]
            # Negative control: a member of another client, on another lease.
            survivor = await observer.group("g").join("survivor", ttl=ttl)
            sizes: list[int] = []
            views = observer.group("g").watch()
            seen = asyncio.Event()

            async def follow() -> None:
                async for view in views:
                    sizes.append(len(view))
                    seen.set()

            follower = asyncio.create_task(follow())
            await seen.wait()
            assert sizes == [6]
            leases = member_leases(sync, "g")
            sync.backend.etcd.revoke_lease(leases["m0"])  # type: ignore[attr-defined]
            # The lease's keep-alive finds it gone (within a third of its TTL), and every
            # member on it is lost, each told.
            assert await eventually(lambda: len(lost) == 5, ttl + 2 * MARGIN), lost
            assert sorted(m for m, _ in lost) == [f"m{i}" for i in range(5)]
            assert all(reason for _, reason in lost)
            assert not any(m.alive for m in members)
            assert survivor.alive
            assert await eventually(lambda: sizes[-1] == 1)
            # Their keys went in one revision: the observer never saw some of them gone.
            assert sizes == [6, 1], sizes
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            # A join now is on a fresh lease.
            again = await client.group("g").join("m0", ttl=ttl)
            assert member_leases(sync, "g")["m0"] != leases["m0"]
            assert again.alive

    asyncio.run(main())


@etcd
def test_a_join_on_a_lease_the_server_dropped_unnoticed_joins_on_a_fresh_one(
    aio_url: str, namespace: str, sync: dcoord.Client
) -> None:
    """The server dropped the shared lease before its keep-alive (every 10 s here)
    noticed: the put on it fails, writing nothing, and the join goes on a fresh lease;
    the member on the dropped lease is lost (known at once: it is not alive)."""

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            first = await client.group("g").join("first", ttl=30)
            dropped = member_leases(sync, "g")["first"]
            sync.backend.etcd.revoke_lease(dropped)  # type: ignore[attr-defined]
            second = await client.group("g").join("second", ttl=30)
            leases = member_leases(sync, "g")
            assert set(leases) == {"second"} and leases["second"] != dropped
            assert second.alive
            assert not first.alive

    asyncio.run(main())


@etcd
def test_a_join_whose_reply_is_lost_leaves_no_member_and_keeps_the_lease(
    aio_url: str, namespace: str, sync: dcoord.Client
) -> None:
    """The join's put reached the server, then the join failed (its reply lost, the
    retries given up): the key is deleted before the error goes on, by its value (the
    join's token: never another client's member of that id), and the shared lease stays
    for the member already on it."""

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            kept = await client.group("g").join("kept", ttl=30)
            kept_lease = member_leases(sync, "g")["kept"]
            backend = etcd_backend(client)
            real = backend.txn
            failed: list[str] = []

            async def reply_lost(request: Any, **options: Any) -> Any:
                response = await real(request, **options)
                if not failed and "join 'doomed'" in options["what"]:
                    failed.append(options["what"])
                    raise BackendUnavailable(f"{options['what']}: the reply was lost (test)")
                return response

            backend.txn = reply_lost  # type: ignore[method-assign]
            with pytest.raises(BackendUnavailable, match="lost"):
                await client.group("g").join("doomed", ttl=30)
            assert failed, "negative control: the put was sent"
            assert set(member_leases(sync, "g")) == {"kept"}
            assert kept.alive
            assert set(member_leases(sync, "g").values()) == {kept_lease}

    asyncio.run(main())
