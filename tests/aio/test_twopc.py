"""The async 2PC's own contract: one log shared with sync coordinators (either finishes
what the other decided), cancellation (a cancelled body aborts, a cancelled commit
leaves what recover() finishes), AsyncKVParticipant sharing its keys with
KVParticipant, and refusing sync participants. Memory, Redis and etcd (real servers)."""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import dcoord
from dcoord import txlog
from dcoord.aio import AsyncClient, AsyncCoordinator, AsyncKVParticipant, connect
from dcoord.txlog import TxState


class Crash(BaseException):
    """Raised by a failpoint: the coordinator stops dead, like a killed process."""


class Ledger:
    """An async participant kept in test memory that records every call."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.prepared: set[str] = set()
        self.committed: set[str] = set()
        self.aborted: set[str] = set()
        self.gate: asyncio.Event | None = None  # prepare waits on it when set
        self.entered = asyncio.Event()

    async def prepare(self, txid: str, payload: Any) -> bool:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        self.prepared.add(txid)
        return True

    async def commit(self, txid: str) -> None:
        assert txid in self.prepared and txid not in self.aborted
        self.committed.add(txid)

    async def abort(self, txid: str) -> None:
        assert txid not in self.committed
        self.aborted.add(txid)
        self.prepared.discard(txid)


class SyncLedger:
    """The same, for a sync coordinator: the two share their sets with ``twin``."""

    def __init__(self, twin: Ledger) -> None:
        self.name = twin.name
        self.twin = twin

    def prepare(self, txid: str, payload: Any) -> bool:
        self.twin.prepared.add(txid)
        return True

    def commit(self, txid: str) -> None:
        assert txid in self.twin.prepared
        self.twin.committed.add(txid)

    def abort(self, txid: str) -> None:
        assert txid not in self.twin.committed
        self.twin.aborted.add(txid)
        self.twin.prepared.discard(txid)


@pytest.fixture
def sync_client(aio_url: str, namespace: str) -> Iterator[dcoord.Client]:
    with dcoord.connect(aio_url, namespace=namespace) as client:
        yield client


def quiet(client: AsyncClient | dcoord.Client, parts: list[Any], **options: Any) -> Any:
    """A coordinator without the durability warning (test servers are what they are)."""
    options.setdefault("max_clock_skew", 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcoord.DurabilityWarning)
        return client.coordinator(participants=parts, **options)


async def started(coordinator: AsyncCoordinator) -> AsyncCoordinator:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcoord.DurabilityWarning)
        return await coordinator.start()


async def until(predicate: Any, timeout: float = 10.0) -> None:
    """Poll an async ``predicate`` until it holds (asserts within ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_commit_and_abort_on_the_async_api(aio_url: str, namespace: str) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            a, b = Ledger("a"), Ledger("b")
            coord = await started(quiet(client, [a, b]))
            async with coord.transaction(timeout=10) as tx:
                tx.enlist("a", {"x": 1})
                tx.enlist("b", None)
            assert tx.state == "committed" and tx.txid in a.committed | b.committed
            await until(lambda: _state(coord, tx.txid, TxState.COMMITTED))
            with pytest.raises(KeyError):
                async with coord.transaction() as dropped:
                    dropped.enlist("a", None)
                    raise KeyError("application failed")
            assert dropped.state == "aborted" and await coord.get(dropped.txid) is None

    asyncio.run(main())


def test_a_payload_changed_after_enlist_is_logged_and_sent_as_enlisted(
    aio_url: str, namespace: str
) -> None:
    """As on the sync API: enlist() takes a snapshot of the payload for the log and for
    the participant."""
    received: dict[str, Any] = {}

    class Receiving(Ledger):
        async def prepare(self, txid: str, payload: Any) -> bool:
            received[txid] = payload
            return await super().prepare(txid, payload)

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            coord = await started(quiet(client, [Receiving("a")]))
            payload = {"x": [1]}
            tx = coord.begin(timeout=10)
            tx.enlist("a", payload)
            payload["x"].append(2)
            record = await tx.commit()
            assert record.digests["a"] == txlog.digest({"x": [1]})
            stored = await coord.get(tx.txid)
            assert stored is not None and stored.digests == record.digests
            assert received[tx.txid] == {"x": [1]}

    asyncio.run(main())


async def _state(coord: Any, txid: str, state: TxState) -> bool:
    record = await coord.get(txid)
    return record is not None and record.state is state


def test_a_sync_participant_is_refused(aio_url: str, namespace: str) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            with pytest.raises(dcoord.ConfigError, match=r"not a Participant.*coroutine"):
                client.coordinator(participants=[object()])
            with pytest.raises(dcoord.ConfigError, match="its prepare is not a coroutine"):
                client.coordinator(participants=[SyncLedger(Ledger("a"))])
            with pytest.raises(dcoord.ConfigError, match="its prepare is not a coroutine"):
                AsyncCoordinator(client, [_HalfAsync()])

    asyncio.run(main())


class _HalfAsync:
    name = "half"

    def prepare(self, txid: str, payload: Any) -> bool:
        return True

    async def commit(self, txid: str) -> None: ...

    async def abort(self, txid: str) -> None: ...


@pytest.mark.parametrize("decider", ["sync", "async"])
def test_sync_and_async_coordinators_finish_each_others_transactions(
    aio_url: str, namespace: str, sync_client: dcoord.Client, decider: str
) -> None:
    """A coordinator of one API dies after the decision; one of the other API resolves
    and recovers it, from the same log."""

    def crash(point: str, txid: str, participant: str | None) -> None:
        if point == "after_decision":
            raise Crash(point)

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            a = Ledger("a")
            if decider == "sync":
                dying: Any = quiet(sync_client, [SyncLedger(a)], failpoint=crash)
                tx = dying.begin(timeout=10)
                tx.enlist("a", None)
                with pytest.raises(Crash):
                    await asyncio.to_thread(tx.commit)
                rescuer = await started(quiet(client, [a]))
                assert await rescuer.resolve(tx.txid) == "committed"
                report = await rescuer.recover()
            else:
                dying = await started(quiet(client, [a], failpoint=crash))
                atx = dying.begin(timeout=10)
                atx.enlist("a", None)
                with pytest.raises(Crash):
                    await atx.commit()
                tx = atx
                sync_rescuer = quiet(sync_client, [SyncLedger(a)])
                assert sync_rescuer.resolve(tx.txid) == "committed"
                report = await asyncio.to_thread(sync_rescuer.recover)
            assert report.committed == [tx.txid] and report.clean
            assert tx.txid in a.committed
            assert (await rescuer_view(client).get(tx.txid)).state is TxState.COMMITTED

    asyncio.run(main())


def rescuer_view(client: AsyncClient) -> AsyncCoordinator:
    """A coordinator without participants: to read the log."""
    return AsyncCoordinator(client, [])


def test_a_cancelled_body_aborts_and_writes_nothing(aio_url: str, namespace: str) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            a = Ledger("a")
            coord = await started(quiet(client, [a]))
            inside = asyncio.Event()
            txs: list[Any] = []

            async def body() -> None:
                async with coord.transaction() as tx:
                    txs.append(tx)
                    tx.enlist("a", None)
                    inside.set()
                    await asyncio.Event().wait()  # cancelled here

            task = asyncio.create_task(body())
            await inside.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            (tx,) = txs
            assert tx.state == "aborted"
            assert await coord.get(tx.txid) is None and not a.entered.is_set()

    asyncio.run(main())


@pytest.mark.parametrize("point", ["prepare", "after_decision"])
def test_a_cancelled_commit_leaves_what_recover_finishes(
    aio_url: str, namespace: str, point: str
) -> None:
    """Cancelled while a participant prepares (undecided: recovery aborts it after the
    deadline, the prepared participant included) or after the decision (recovery
    commits it); the other participant's task is cancelled with the commit."""

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            a, b = Ledger("a"), Ledger("b")
            reached = asyncio.Event()
            hold = asyncio.Event()

            async def failpoint(at: str, txid: str, participant: str | None) -> None:
                if at == point:
                    reached.set()
                    await hold.wait()  # cancelled here

            if point == "prepare":
                b.gate = hold  # a prepares at once, b waits: cancelled inside b's prepare
                reached = b.entered
            coord = await started(quiet(client, [a, b], failpoint=failpoint))
            tx = coord.begin(timeout=1.0)
            tx.enlist("a", None)
            tx.enlist("b", None)
            task = asyncio.create_task(tx.commit())
            await reached.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert tx.state == "unknown"
            rescuer = await started(quiet(client, [a, b]))
            if point == "prepare":
                assert (await rescuer.recover()).pending == [tx.txid]
                record = await rescuer.get(tx.txid)
                assert record is not None and record.state is TxState.STARTED
                await until(lambda: _past(rescuer, tx.txid))
                report = await rescuer.recover()
                assert report.aborted == [tx.txid] and report.clean
                assert not a.committed and tx.txid not in a.prepared and tx.txid in a.aborted
            else:
                report = await rescuer.recover()
                assert report.committed == [tx.txid] and report.clean
                assert tx.txid in a.committed and tx.txid in b.committed
            assert (await rescuer.recover()).scanned == 0

    asyncio.run(main())


async def _past(coord: AsyncCoordinator, txid: str) -> bool:
    record = await coord.get(txid)
    assert record is not None
    return time.time() >= record.deadline


def test_async_and_sync_kv_participants_share_their_keys(
    aio_url: str, namespace: str, sync_client: dcoord.Client
) -> None:
    """Transfers through async coordinators and AsyncKVParticipants and through a sync
    coordinator and KVParticipants of the same names: one set of balances; a prepare
    left by a dead async coordinator is released by a sync recover()."""

    def crash(point: str, txid: str, participant: str | None) -> None:
        # After alice's prepare, not after the first one: the two are asked at once, and
        # a crash after bob's could cancel alice's before it staged anything (1 run in
        # 4 under load), leaving nothing in doubt to check.
        if point == "after_prepare" and participant == "alice":
            raise Crash(point)

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            alice, bob = AsyncKVParticipant(client, "alice"), AsyncKVParticipant(client, "bob")
            coord = await started(quiet(client, [alice, bob]))
            async with coord.transaction(timeout=10) as tx:
                tx.enlist("alice", {"set": {"balance": 100}})
                tx.enlist("bob", {"set": {"balance": 0}})
            for _ in range(3):
                async with coord.transaction(timeout=10) as tx:
                    tx.enlist("alice", {"add": {"balance": -10}})
                    tx.enlist("bob", {"add": {"balance": 10}})
            sync_parts = [dcoord.KVParticipant(sync_client, n) for n in ("alice", "bob")]
            sync_coord = quiet(sync_client, sync_parts)

            def sync_transfer() -> None:
                with sync_coord.transaction(timeout=10) as stx:
                    stx.enlist("alice", {"add": {"balance": -5}})
                    stx.enlist("bob", {"add": {"balance": 5}})

            await asyncio.to_thread(sync_transfer)
            assert await alice.get("balance") == 65 and await bob.get("balance") == 35
            assert sync_parts[0].get("balance") == 65
            dying = await started(quiet(client, [alice, bob], failpoint=crash))
            dead = dying.begin(timeout=0.5)
            dead.enlist("alice", {"add": {"balance": -1}})
            dead.enlist("bob", {"add": {"balance": 1}})
            with pytest.raises(Crash):
                await dead.commit()
            assert dead.txid in await alice.in_doubt()
            assert await alice.reserved() == {"balance": dead.txid}
            await until(lambda: _past(dying, dead.txid))
            report = await asyncio.to_thread(sync_coord.recover)
            assert report.aborted == [dead.txid] and report.clean
            assert await alice.in_doubt() == [] and await alice.reserved() == {}
            assert await alice.items() == {"balance": 65}
            with pytest.raises(dcoord.ConfigError, match="unknown KVParticipant operation"):
                coord.begin().enlist("alice", {"bump": {"balance": 1}})

    asyncio.run(main())


def test_close_waits_for_background_log_writes(aio_url: str, namespace: str) -> None:
    async def main() -> None:
        client = await connect(aio_url, namespace=namespace)
        a = Ledger("a")
        coord = await started(quiet(client, [a]))
        txids = []
        for _ in range(5):
            async with coord.transaction(timeout=10) as tx:
                tx.enlist("a", None)
            txids.append(tx.txid)
        await client.close()  # closes the coordinator first: its "done" writes land
        with pytest.raises(dcoord.ClientClosed):
            coord.begin()
        async with connect(aio_url, namespace=namespace) as reader:
            view = rescuer_view(reader)
            states = {(await view.get(t)).state for t in txids}  # type: ignore[union-attr]
            assert states == {TxState.COMMITTED}

    asyncio.run(main())
