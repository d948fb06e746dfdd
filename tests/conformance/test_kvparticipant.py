"""KVParticipant: staged writes, key locks with fences, reservations that survive a crash."""

from __future__ import annotations

import contextlib
import random
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pytest

import dcoord
from dcoord.participants import KVParticipant


class Crash(BaseException):
    """Raised by a failpoint: the coordinator stops dead, like a killed process."""


def non_negative(new: Mapping[str, Any]) -> bool:
    return all(v is None or v >= 0 for v in new.values())


def bank(client: dcoord.Client, name: str, **options: Any) -> KVParticipant:
    options.setdefault("validate", non_negative)
    return KVParticipant(client, name, **options)


def coordinator(client: dcoord.Client, parts: list[KVParticipant], **options: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcoord.DurabilityWarning)
        return client.coordinator(participants=parts, **options)


def seed(coord: dcoord.Coordinator, balances: dict[str, dict[str, int]]) -> None:
    with coord.transaction() as tx:
        for name, accounts in balances.items():
            tx.enlist(name, {"set": accounts})


def transfer(coord: dcoord.Coordinator, src: tuple[str, str], dst: tuple[str, str], n: int) -> None:
    with coord.transaction(timeout=10) as tx:
        tx.enlist(src[0], {"add": {src[1]: -n}})
        tx.enlist(dst[0], {"add": {dst[1]: n}})


def test_transfer_commits_atomically_and_leaves_nothing_in_doubt(client: dcoord.Client) -> None:
    a, b = bank(client, "a"), bank(client, "b")
    coord = coordinator(client, [a, b])
    seed(coord, {"a": {"alice": 100}, "b": {"bob": 5}})
    transfer(coord, ("a", "alice"), ("b", "bob"), 30)
    assert a.get("alice") == 70 and b.get("bob") == 35
    assert a.items() == {"alice": 70}
    assert a.in_doubt() == [] and b.in_doubt() == []
    with pytest.raises(dcoord.TransactionAborted) as info:
        transfer(coord, ("a", "alice"), ("b", "bob"), 71)  # would go negative: a votes no
    assert info.value.votes["a"] is False
    assert a.get("alice") == 70 and b.get("bob") == 35
    assert a.in_doubt() == [] and b.in_doubt() == []
    # Nothing stays reserved: the same keys commit again at once.
    transfer(coord, ("a", "alice"), ("b", "bob"), 70)
    assert a.get("alice") == 0 and b.get("bob") == 105


def test_set_add_delete_and_bad_payloads(client: dcoord.Client) -> None:
    kv = KVParticipant(client, "kv")
    coord = coordinator(client, [kv])
    with coord.transaction() as tx:
        tx.enlist("kv", {"set": {"x": {"nested": [1, 2]}, "gone": 1}, "add": {"n": 2.5}})
    with coord.transaction() as tx:
        tx.enlist("kv", {"delete": ["gone"], "add": {"n": 1}})
    assert kv.items() == {"x": {"nested": [1, 2]}, "n": 3.5}
    # Only the current value can make this one fail: it is a "no" vote at prepare.
    with pytest.raises(dcoord.TransactionAborted) as info, coord.transaction() as tx:
        tx.enlist("kv", {"add": {"x": 1}})
    assert "not a number" in str(info.value.votes["kv"])
    assert kv.items() == {"x": {"nested": [1, 2]}, "n": 3.5}
    with pytest.raises(dcoord.ConfigError, match="participant name"):
        KVParticipant(client, "bad/name")


def _cyclic() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"add": {"n": "1"}}, "must be a number"),
        ({"set": {"a": 1}, "delete": ["a"]}, "more than one operation"),
        ({"frobnicate": {}}, "frobnicate"),
        ({"debit": ["alice", 10]}, "debit"),
        ({}, "non-empty mapping"),
        ({"set": {"": 1}}, "non-empty str"),
        ({"set": {"k": object()}}, "'k'.*JSON"),
        ({"set": {"k": float("nan")}}, "'k'.*JSON"),
        ({"set": {"k": [1, float("inf")]}}, "'k'.*JSON"),
        ({"set": {"k": _cyclic()}}, "'k'.*JSON"),
        ({"add": {"k": float("inf")}}, "'k'.*finite"),
        ({"add": {"k": float("nan")}}, "'k'.*finite"),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_a_payload_that_can_never_prepare_is_refused_by_enlist(
    client: dcoord.Client, payload: Any, match: str
) -> None:
    """Bad input is a ConfigError from enlist(), not a "no" vote after a log write."""
    kv = KVParticipant(client, "kv")
    coord = coordinator(client, [kv])
    tx = coord.begin()
    with pytest.raises(dcoord.ConfigError, match=match):
        tx.enlist("kv", payload)
    assert tx.payloads == {} and tx.state == "open"
    assert coord.transactions() == [] and kv.in_doubt() == []


def test_more_keys_than_the_backend_can_apply_at_once_is_refused_by_enlist(
    client: dcoord.Client, backend: str
) -> None:
    """etcd caps a transaction at 128 operations: a commit of k keys needs 2k+1."""
    kv = KVParticipant(client, "kv")
    coord = coordinator(client, [kv])
    many = {"set": {f"k{i}": i for i in range(64)}}
    if backend == "etcd":
        with pytest.raises(dcoord.ConfigError, match=r"64 keys.*at most 63"):
            coord.begin().enlist("kv", many)
        fits = {"set": {f"k{i}": i for i in range(63)}}
    else:
        fits = many  # no such limit: the negative control
    with coord.transaction() as tx:
        tx.enlist("kv", fits)
    assert len(kv.items()) == len(fits["set"]) and kv.in_doubt() == []


@pytest.mark.slow
def test_opposite_concurrent_transfers_never_deadlock_and_conserve_money(
    client: dcoord.Client,
) -> None:
    """Two hot keys, transfers both ways in parallel: wait-die settles every conflict at
    once (no lock timeouts), so retrying callers all get through quickly."""
    a, b = bank(client, "a", lock_timeout=5), bank(client, "b", lock_timeout=5)
    coord = coordinator(client, [a, b])
    seed(coord, {"a": {"alice": 1000}, "b": {"bob": 1000}})
    attempts: list[int] = []

    def worker(i: int) -> None:
        for j in range(4):
            ab = (i + j) % 2 == 0
            src, dst = (("a", "alice"), ("b", "bob")) if ab else (("b", "bob"), ("a", "alice"))
            for attempt in range(1, 200):
                try:
                    transfer(coord, src, dst, 1 + i)
                except dcoord.TransactionAborted:
                    time.sleep(random.uniform(0, 0.01))  # a client backs off, then retries
                    continue
                attempts.append(attempt)
                break

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(attempts) == 16, attempts  # every transfer committed in the end
    assert time.monotonic() - started < 60
    net = sum((1 + i) * (1 if (i + j) % 2 == 0 else -1) for i in range(4) for j in range(4))
    assert a.get("alice") == 1000 - net and b.get("bob") == 1000 + net
    assert a.in_doubt() == [] and b.in_doubt() == []


@pytest.mark.slow
def test_participant_crash_between_prepare_and_commit(client: dcoord.Client, backend: str) -> None:
    """Locks lapse with the dead process; the reservation keeps the keys until recovery."""
    ttl = 2.0 if backend == "etcd" else 0.5  # etcd grants no lease under ~2 s
    a, b = bank(client, "a", lock_ttl=ttl), bank(client, "b", lock_ttl=ttl)
    seed(coordinator(client, [a, b]), {"a": {"alice": 100}, "b": {"bob": 0}})

    def crash(point: str, txid: str, participant: str | None) -> None:
        if point == "after_decision":
            raise Crash(point)

    dying = coordinator(client, [a, b], failpoint=crash)
    with pytest.raises(Crash):
        transfer(dying, ("a", "alice"), ("b", "bob"), 40)
    (txid,) = a.in_doubt()
    time.sleep(ttl + 0.2)  # the dead process's locks expire: nobody releases them
    # Fresh participant instances (a restarted process): the keys are still reserved.
    a2 = bank(client, "a", lock_ttl=ttl, lock_timeout=0.3)
    b2 = bank(client, "b", lock_ttl=ttl, lock_timeout=0.3)
    other = coordinator(client, [a2, b2])
    with pytest.raises(dcoord.TransactionAborted) as info:
        transfer(other, ("a", "alice"), ("b", "bob"), 1)
    assert False in info.value.votes.values()
    assert a2.get("alice") == 100  # the decided commit is not applied yet, nor overwritten
    report = other.recover()
    assert report.committed == [txid]
    assert a2.get("alice") == 60 and b2.get("bob") == 40
    assert a2.in_doubt() == [] and b2.in_doubt() == []
    transfer(other, ("a", "alice"), ("b", "bob"), 60)
    assert a2.get("alice") == 0 and b2.get("bob") == 100


def test_swap_applies_or_returns_the_current_values(client: dcoord.Client) -> None:
    kv = client.backend.kv  # one hash tag: one slot, as a Redis Cluster requires
    kv.put("{s}a", b"1")
    assert kv.swap({"{s}b": b"2"}, ["{s}a"], only_if={"{s}a": b"1", "{s}b": None}) is None
    assert kv.get("{s}a") is None and kv.get("{s}b") == b"2"
    # A wrong guess changes nothing and answers with the truth, absent keys as None.
    assert kv.swap({"{s}c": b"3"}, ["{s}b"], only_if={"{s}a": b"1", "{s}b": None}) == {
        "{s}a": None,
        "{s}b": b"2",
    }
    assert kv.get("{s}b") == b"2" and kv.get("{s}c") is None
    assert kv.apply({"{s}c": b"3"}, only_if={"{s}b": b"2"}) is True
    assert kv.apply({"{s}c": b"4"}, only_if={"{s}b": b"x"}) is False and kv.get("{s}c") == b"3"


def test_a_stale_remembered_value_never_costs_a_no_vote(client: dcoord.Client) -> None:
    """An instance remembers alice=5 from its own commit; another process raises it to
    100. Withdrawing 50 must be computed from 100 (a yes), not refused from 5; and a
    withdrawal the true balance cannot cover is refused (the negative control)."""
    here, there = bank(client, "a"), bank(client, "a")
    seed(coordinator(client, [here]), {"a": {"alice": 5}})
    seed(coordinator(client, [there]), {"a": {"alice": 100}})
    coord = coordinator(client, [here])
    with coord.transaction() as tx:
        tx.enlist("a", {"add": {"alice": -50}})
    assert here.get("alice") == 50
    with pytest.raises(dcoord.TransactionAborted) as info, coord.transaction() as tx:
        tx.enlist("a", {"add": {"alice": -51}})
    assert info.value.votes["a"] is False and there.get("alice") == 50


def test_prepare_paused_between_read_and_stage_cannot_stage_from_its_read(
    client: dcoord.Client,
) -> None:
    """A prepare that computed k+10 from k=1 and then paused (GC, SIGSTOP) while another
    transaction committed k=2 must not stage 11: its staging write fails and it computes
    again from 2. Without locks nothing expires; the write's condition catches it."""
    computed = threading.Event()
    resume = threading.Event()

    class Paused(KVParticipant):
        def _stage(self, txid: str, keys: Any, seen: Any, staged: Any) -> Any:
            if not computed.is_set():
                computed.set()
                assert resume.wait(10)
            return super()._stage(txid, keys, seen, staged)

    slow = Paused(client, "a")
    fast = KVParticipant(client, "a")
    seed(coordinator(client, [fast]), {"a": {"k": 1}})
    slow.get("k")
    result: list[bool] = []
    thread = threading.Thread(
        target=lambda: result.append(slow.prepare("slow-tx", {"add": {"k": 10}}))
    )
    thread.start()
    assert computed.wait(5)
    with coordinator(client, [fast]).transaction() as tx:
        tx.enlist("a", {"set": {"k": 2}})
    resume.set()
    thread.join(10)
    assert result == [True]
    slow.commit("slow-tx")
    assert fast.get("k") == 12 and fast.in_doubt() == []


def test_phase2_is_delivered_while_every_worker_waits_in_prepare(client: dcoord.Client) -> None:
    """workers=1 and that worker is in a prepare that waits (wait-die) for the reservation
    of a decided commit: the commit delivery must not queue behind it, or the waiter
    votes no once its lock_timeout passes (a spurious abort) and the commit is late."""
    waiting = threading.Event()

    class Waiter(KVParticipant):
        def _wait_unreserved(self, key: str, holder: str, deadline: float) -> bool:
            waiting.set()
            return super()._wait_unreserved(key, holder, deadline)

    a = Waiter(client, "a", lock_timeout=10)
    holder_txid = "z-holder"

    def hold(point: str, txid: str, participant: str | None) -> None:
        # The holder has decided commit; deliver it only once the waiter occupies the pool.
        if point == "after_decision" and txid == holder_txid:
            assert waiting.wait(10)

    coord = coordinator(client, [a], workers=1, failpoint=hold)
    holder, waiter = coord.begin(), coord.begin()
    holder.txid, waiter.txid = holder_txid, "a-waiter"  # wait-die: the smaller txid waits
    holder.enlist("a", {"add": {"k": 1}})
    waiter.enlist("a", {"add": {"k": 10}})
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(_outcome(holder)))
    thread.start()
    wait_for(lambda: a.in_doubt() == [holder_txid])
    results.append(_outcome(waiter))
    thread.join(30)
    assert results == ["committed", "committed"], results
    assert a.get("k") == 11 and a.in_doubt() == []


@pytest.mark.slow
def test_four_times_workers_contending_transactions_get_phase2_in_time(
    client: dcoord.Client,
) -> None:
    """4 x workers concurrent transfers over two hot accounts: every commit decision is
    delivered within phase2_timeout (deliveries never wait for a worker stuck in prepare),
    and the money adds up."""
    workers, phase2_timeout = 2, 5.0
    decided: dict[str, float] = {}
    late: list[tuple[str, float]] = []
    mutex = threading.Lock()

    def clock(point: str, txid: str, participant: str | None) -> None:
        with mutex:
            if point == "after_decision":
                decided[txid] = time.monotonic()
            elif point == "after_commit":
                delay = time.monotonic() - decided[txid]
                if delay >= phase2_timeout:
                    late.append((txid, delay))

    a, b = bank(client, "a", lock_timeout=8), bank(client, "b", lock_timeout=8)
    seed(coordinator(client, [a, b]), {"a": {"alice": 1000}, "b": {"bob": 1000}})
    coord = coordinator(
        client, [a, b], workers=workers, phase2_timeout=phase2_timeout, failpoint=clock
    )
    committed: list[int] = []

    def worker(i: int) -> None:
        src, dst = (("a", "alice"), ("b", "bob")) if i % 2 else (("b", "bob"), ("a", "alice"))
        for _ in range(3):
            with contextlib.suppress(dcoord.TransactionAborted):
                transfer(coord, src, dst, 1)
                committed.append(1 if i % 2 else -1)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4 * workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not late, late
    assert committed  # some got through; wait-die aborts of the others are legitimate
    assert a.get("alice") == 1000 - sum(committed) and b.get("bob") == 1000 + sum(committed)
    wait_for(lambda: a.in_doubt() == [] and b.in_doubt() == [])


def _outcome(tx: dcoord.Transaction) -> str:
    try:
        tx.commit()
    except dcoord.TransactionAborted as exc:
        return f"aborted: {exc}"
    return "committed"


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_prepare_arriving_after_abort_is_cleaned_by_recover(client: dcoord.Client) -> None:
    a = KVParticipant(client, "a")
    coord = coordinator(client, [a])
    seed(coord, {"a": {"k": 1}})
    # A transaction the log never heard of (or aborted and forgot): presumed abort.
    assert a.prepare("ghost", {"set": {"k": 99}}) is True
    assert a.in_doubt() == ["ghost"]
    report = coord.recover()
    assert report.in_doubt_resolved == ["ghost"]
    assert a.in_doubt() == [] and a.get("k") == 1
    with coord.transaction() as tx:  # the key is free again
        tx.enlist("a", {"set": {"k": 3}})
    assert a.get("k") == 3


def test_commit_and_abort_are_idempotent(client: dcoord.Client) -> None:
    a = KVParticipant(client, "a")
    assert a.prepare("t1", {"add": {"k": 5}})
    assert a.prepare("t1", {"add": {"k": 5}})  # a repeated prepare keeps its yes
    a.commit("t1")
    a.commit("t1")
    a.abort("t1")  # after commit: nothing to drop
    a.abort("never-prepared")
    assert a.get("k") == 5 and a.in_doubt() == []


def test_reserved_lists_the_keys_a_prepared_transaction_holds(client: dcoord.Client) -> None:
    """What the randomized suite checks is left behind (none after the outcome)."""
    a = bank(client, "a")
    assert a.prepare("tx-1", {"set": {"alice": 1}, "delete": ["bob"]})
    assert a.reserved() == {"alice": "tx-1", "bob": "tx-1"}
    assert bank(client, "b").reserved() == {}  # another participant's keys are its own
    a.abort("tx-1")
    assert a.reserved() == {}
