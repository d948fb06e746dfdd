"""``min_replicas`` on the async 2PC: forced writes (the log, AsyncKVParticipant's
staging) WAIT for replicas as the sync ones do (tests/conformance/test_redis_replicas.py,
whose primary and replica fixtures these reuse), on real Redis servers."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import pytest

import dcoord
from dcoord import txlog
from dcoord.aio import AsyncClient, AsyncKVParticipant, connect
from dcoord.backends.redis.txlog import record_key
from tests.conformance.test_redis_replicas import primary, replica  # noqa: F401  (fixtures)
from tests.servers import Server

REPLICA_TIMEOUT = 0.5


async def coordinator(client: AsyncClient, *parts: Any, **options: Any) -> Any:
    """A started coordinator (the test servers keep no AOF: no durability warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcoord.DurabilityWarning)
        return await client.coordinator(participants=parts, **options).start()


def test_too_few_replicas_aborts_before_any_participant_is_asked(
    primary: Server,  # noqa: F811
    namespace: str,
) -> None:
    async def main() -> None:
        async with connect(
            primary.url, namespace=namespace, min_replicas=1, replica_timeout=REPLICA_TIMEOUT
        ) as client:
            part = AsyncKVParticipant(client, "bank")
            coord = await coordinator(client, part)
            with pytest.raises(dcoord.TransactionAborted, match="min_replicas=1"):
                async with coord.transaction() as tx:
                    tx.enlist("bank", {"set": {"alice": 1}})
            assert await part.get("alice") is None and await part.in_doubt() == []
            with pytest.raises(dcoord.BackendUnavailable, match="min_replicas=1"):
                await part.prepare("tx-1", {"set": {"alice": 1}})  # no yes on a primary alone

    asyncio.run(main())


def test_a_decision_the_replicas_lack_is_not_reported_committed(
    primary: Server,  # noqa: F811
    replica: Server,  # noqa: F811
    namespace: str,
) -> None:
    """As the sync test of that name: the replica stops acknowledging after the yes vote;
    commit() and resolve() raise instead of reporting a decision only the primary has,
    and once the replica is back recover() confirms it and commits."""

    async def main() -> None:
        async with connect(
            primary.url, namespace=namespace, min_replicas=1, replica_timeout=REPLICA_TIMEOUT
        ) as client:
            part = AsyncKVParticipant(client, "bank")

            def pause_replica(point: str, txid: str, participant: str | None) -> None:
                if point == "after_prepare":
                    replica.pause()

            coord = await coordinator(client, part, failpoint=pause_replica)
            tx = coord.begin()
            tx.enlist("bank", {"set": {"alice": 1}})
            try:
                with pytest.raises(dcoord.BackendUnavailable, match="min_replicas=1"):
                    await tx.commit()
                assert await part.get("alice") is None
                assert await part.in_doubt() == [tx.txid]
                with pytest.raises(dcoord.BackendUnavailable, match="min_replicas=1"):
                    await coord.resolve(tx.txid)
            finally:
                replica.resume()
            report = await coord.recover()
            assert report.committed == [tx.txid], report
            assert await part.get("alice") == 1 and await part.in_doubt() == []
            admin = replica.redis_admin()
            try:
                stored = admin.get(record_key(f"dcoord:{namespace}:tx:", namespace, tx.txid))
            finally:
                admin.close()
            assert stored is not None and txlog.decode(tx.txid, stored).state.finished

    asyncio.run(main())
