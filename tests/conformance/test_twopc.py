"""Two-phase commit and its decision log: the same assertions on every backend."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import pytest

import dcoord
from dcoord import twopc, txlog
from dcoord.txlog import TxState


class Crash(BaseException):
    """Raised by a failpoint: the coordinator stops dead, like a killed process."""


class Bank:
    """A participant kept in test memory that records every call."""

    def __init__(self, name: str, vote: bool = True, raises: bool = False) -> None:
        self.name = name
        self.vote = vote
        self.raises = raises
        self.gate: threading.Event | None = None  # prepare waits on it when set
        self.prepared: set[str] = set()
        self.committed: set[str] = set()
        self.aborted: set[str] = set()
        self.mutex = threading.Lock()

    def prepare(self, txid: str, payload: Any) -> bool:
        if self.gate is not None:
            self.gate.wait(10)
        if self.raises:
            raise RuntimeError(f"{self.name} is on fire")
        if self.vote:
            with self.mutex:
                self.prepared.add(txid)
        return self.vote

    def commit(self, txid: str) -> None:
        with self.mutex:
            assert txid in self.prepared, "commit of a transaction never prepared"
            assert txid not in self.aborted
            self.committed.add(txid)

    def abort(self, txid: str) -> None:
        with self.mutex:
            assert txid not in self.committed, "abort after commit"
            self.aborted.add(txid)
            self.prepared.discard(txid)


def banks(*names: str) -> list[Bank]:
    return [Bank(n) for n in names]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def state_of(coord: dcoord.Coordinator, txid: str) -> TxState | None:
    record = coord.get(txid)
    return None if record is None else record.state


@pytest.fixture
def coordinator(client: dcoord.Client) -> Callable[..., dcoord.Coordinator]:
    def make(participants: list[Bank], **options: Any) -> dcoord.Coordinator:
        # Every coordinator of a test shares this host's clock: on etcd, where deadlines
        # are judged by local clocks, no grace for skew is needed (the skew tests set it).
        options.setdefault("max_clock_skew", 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dcoord.DurabilityWarning)
            return client.coordinator(participants=participants, **options)

    return make


def test_commit_reaches_every_participant_and_finishes_the_record(coordinator: Any) -> None:
    a, b, c = banks("a", "b", "c")
    coord = coordinator([a, b, c])
    with coord.transaction(timeout=10) as tx:
        tx.enlist("a", {"debit": 10})
        tx.enlist("b", {"credit": 10})
        tx.enlist("c", None)
    assert tx.state == "committed"
    assert all(tx.txid in p.committed for p in (a, b, c))
    assert tx.record is not None and tx.record.outcome == "committed"
    wait_for(lambda: state_of(coord, tx.txid) is TxState.COMMITTED)
    record = coord.get(tx.txid)
    assert record is not None and set(record.acks) == {"a", "b", "c"}
    assert record.digests["a"] == txlog.digest({"debit": 10})
    assert [r.txid for r in coord.transactions(state="committed")] == [tx.txid]


class Receiving(Bank):
    """A Bank that keeps the payload each prepare was sent (the object itself)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.payloads: dict[str, Any] = {}

    def prepare(self, txid: str, payload: Any) -> bool:
        self.payloads[txid] = payload
        return super().prepare(txid, payload)


def test_a_payload_changed_after_enlist_is_logged_and_sent_as_enlisted(
    coordinator: Any,
) -> None:
    """enlist() takes a snapshot: the digest the log records and the payload the
    participant is sent are the enlisted ones, whatever the caller changes later."""
    a, b = Receiving("a"), Receiving("b")
    coord = coordinator([a, b])
    payload: dict[str, Any] = {"debit": 10, "memo": ["rent"]}
    tx = coord.begin(timeout=10)
    tx.enlist("a", payload)
    tx.enlist("b", None)
    payload["debit"] = 99  # after enlist: must not reach the log or the participant
    payload["memo"].append("changed")
    record = tx.commit()
    enlisted = {"debit": 10, "memo": ["rent"]}
    assert record.digests["a"] == txlog.digest(enlisted) != txlog.digest(payload)
    stored = coord.get(tx.txid)
    assert stored is not None and stored.digests == record.digests
    assert a.payloads[tx.txid] == enlisted
    payload["memo"].append("again")  # and the participant's copy is not the caller's
    assert a.payloads[tx.txid] == enlisted


def test_a_payload_that_cannot_be_copied_is_refused_at_enlist(coordinator: Any) -> None:
    coord = coordinator([Bank("a")])
    tx = coord.begin(timeout=10)
    with pytest.raises(dcoord.ConfigError, match="payload for 'a' cannot be copied"):
        tx.enlist("a", {"lock": threading.Lock()})
    assert tx.payloads == {}


def test_begin_and_commit_without_context_manager(coordinator: Any) -> None:
    a, b = banks("a", "b")
    coord = coordinator([a, b])
    tx = coord.begin(timeout=10)
    tx.enlist("a", 1)
    tx.enlist("b", 2)
    record = tx.commit()
    assert record.state is TxState.COMMITTING
    assert tx.txid in a.committed and tx.txid in b.committed


def test_exception_in_block_aborts_without_touching_anyone(coordinator: Any) -> None:
    a = Bank("a")
    coord = coordinator([a])
    with pytest.raises(KeyError), coord.transaction() as tx:
        tx.enlist("a", 1)
        raise KeyError("application failed")
    assert tx.state == "aborted"
    assert not a.prepared and not a.committed
    assert coord.get(tx.txid) is None  # nothing was written: nothing to recover


@pytest.mark.parametrize("failure", ["no", "raise"])
def test_a_refusing_participant_aborts_everywhere(coordinator: Any, failure: str) -> None:
    a, b, c = banks("a", "b", "c")
    if failure == "no":
        b.vote = False
    else:
        b.raises = True
    coord = coordinator([a, b, c])
    with pytest.raises(dcoord.TransactionAborted) as info, coord.transaction() as tx:
        for p in "abc":
            tx.enlist(p, None)
    votes = info.value.votes
    assert info.value.txid == tx.txid
    if failure == "no":
        assert votes["b"] is False
    else:
        assert "RuntimeError" in str(votes["b"]) and "on fire" in str(votes["b"])
    assert not (a.committed | b.committed | c.committed)
    assert not a.prepared and not c.prepared  # whoever prepared was told to abort
    wait_for(lambda: state_of(coord, tx.txid) is TxState.ABORTED)


def test_a_silent_participant_aborts_at_the_deadline(coordinator: Any) -> None:
    a, slow = banks("a", "slow")
    slow.gate = threading.Event()
    coord = coordinator([a, slow])
    tx = coord.begin(timeout=0.5)
    tx.enlist("a", None)
    tx.enlist("slow", None)
    started = time.monotonic()
    with pytest.raises(dcoord.TransactionAborted) as info:
        tx.commit()
    assert time.monotonic() - started < 0.5 + 1.0
    assert "deadline" in str(info.value.votes["slow"])
    assert not a.prepared and not a.committed
    # Its yes arrives too late: the coordinator aborts it rather than leave it prepared.
    slow.gate.set()
    wait_for(lambda: tx.txid in slow.aborted and tx.txid not in slow.prepared)
    assert not slow.committed


class Stalling(Bank):
    """Answers at once, until ``stall_until`` is set: then its prepare outlasts that
    transaction's deadline (polled, no sleep-as-synchronisation) and votes yes."""

    stall_until: float | None = None

    def prepare(self, txid: str, payload: Any) -> bool:
        while self.stall_until is not None and time.monotonic() < self.stall_until:
            time.sleep(0.01)
        return super().prepare(txid, payload)


def test_a_fast_participant_that_stalls_past_the_deadline_is_still_aborted(
    coordinator: Any,
) -> None:
    """Participants that answered fast are asked on the caller's thread, which cannot give
    up on them at the deadline; their late yes must still end in abort, never commit."""
    a, stalling = Bank("a"), Stalling("stalling")
    coord = coordinator([a, stalling])
    for _ in range(200):  # until an answer was timed fast (a busy host may delay some)
        with coord.transaction(timeout=10) as tx:
            tx.enlist("a", None)
            tx.enlist("stalling", None)
        if coord._pace.fast("prepare", "stalling"):
            break
    assert coord._pace.fast("prepare", "stalling")  # so the next one is asked inline
    tx = coord.begin(timeout=0.3)
    tx.enlist("a", None)
    tx.enlist("stalling", None)
    stalling.stall_until = time.monotonic() + 0.6
    with pytest.raises(dcoord.TransactionAborted, match="deadline"):
        tx.commit()
    assert tx.txid in stalling.aborted and tx.txid in a.aborted
    assert not stalling.committed & {tx.txid} and not a.committed & {tx.txid}
    assert state_of(coord, tx.txid) in (TxState.ABORTING, TxState.ABORTED)
    assert not coord._pace.fast("prepare", "stalling")  # back to the pool next time


def test_slow_participants_are_asked_in_parallel(coordinator: Any) -> None:
    """Participants that take long to answer prepare at the same time, from the pool: each
    waits until all three are inside prepare together, which asking them one after the
    other on the caller's thread would never reach (each would wait out its 5 s)."""
    inside, mutex = [0], threading.Lock()
    together = threading.Event()

    class Slow(Bank):
        def prepare(self, txid: str, payload: Any) -> bool:
            with mutex:
                inside[0] += 1
                if inside[0] == 3:
                    together.set()
            reached = together.wait(5)
            time.sleep(0.005)  # the participant's own work: slower than inline asking allows
            with mutex:
                inside[0] -= 1
                if inside[0] == 0:
                    together.clear()
            assert reached, "the three prepares never ran at the same time"
            return super().prepare(txid, payload)

    parts = [Slow("a"), Slow("b"), Slow("c")]
    coord = coordinator(parts)
    for _ in range(3):
        with coord.transaction(timeout=30) as tx:
            for p in parts:
                tx.enlist(p.name, None)


def test_votes_are_as_documented_when_the_coordinator_stops_at_the_first_no(
    coordinator: Any,
) -> None:
    """docs/transactions.md, "Votes": a participant still preparing when another voted no
    is not waited for, and shows "not needed: aborting"."""
    no, slow = Bank("no", vote=False), Bank("slow")
    slow.gate = threading.Event()
    coord = coordinator([no, slow])
    tx = coord.begin(timeout=10)
    tx.enlist("no", None)
    tx.enlist("slow", None)
    with pytest.raises(dcoord.TransactionAborted) as info:
        tx.commit()
    slow.gate.set()
    assert info.value.votes == {"no": False, "slow": "not needed: aborting"}
    assert info.value.reason == "no voted no; slow: not needed: aborting"
    wait_for(lambda: tx.txid in slow.aborted and tx.txid not in slow.prepared)


def test_enlist_and_options_validate_input(coordinator: Any, client: dcoord.Client) -> None:
    coord = coordinator(banks("a"))
    tx = coord.begin()
    with pytest.raises(dcoord.ConfigError, match="'zz'"):
        tx.enlist("zz", 1)
    tx.enlist("a", 1)
    with pytest.raises(dcoord.ConfigError, match="already enlisted"):
        tx.enlist("a", 2)
    with pytest.raises(dcoord.ConfigError, match="timeout"):
        coord.begin(timeout=0)
    with pytest.raises(dcoord.ConfigError, match="timeout"):
        coord.begin(timeout=float("nan"))
    with pytest.raises(dcoord.ConfigError, match="two participants"):
        coordinator(banks("a", "a"))
    with pytest.raises(dcoord.ConfigError, match="not a Participant"):
        client.coordinator(participants=[object()])  # type: ignore[list-item]
    with pytest.raises(dcoord.ConfigError, match="no participants"):
        coord.begin().commit()
    assert coord.transactions() == []  # none of the above wrote anything


def test_misuse_raises_state_errors_not_config_errors(
    coordinator: Any, client: dcoord.Client
) -> None:
    """ConfigError is for bad input only: a finished transaction, a txid already in the
    log and a closed client each have their own error type."""
    a = Bank("a")
    coord = coordinator([a])
    with coord.transaction() as tx:
        tx.enlist("a", None)
    with pytest.raises(dcoord.TransactionStateError, match=f"{tx.txid}.*committed"):
        tx.enlist("a", 1)
    with pytest.raises(dcoord.TransactionStateError, match="committed"):
        tx.commit()
    dropped = coord.begin()
    dropped.abort()
    with pytest.raises(dcoord.TransactionStateError, match="aborted"):
        dropped.commit()
    twin = coord.begin()
    twin.txid = tx.txid  # a txid that is already in the log
    twin.enlist("a", None)
    with pytest.raises(dcoord.TransactionStateError, match=f"{tx.txid}.*already exists"):
        twin.commit()
    assert tx.txid not in a.aborted  # the duplicate never reached a participant
    client.close()
    with pytest.raises(dcoord.ClientClosed, match="closed"):
        coord.begin()
    for call in (coord.recover, lambda: coord.resolve(tx.txid), lambda: coord.get(tx.txid)):
        with pytest.raises(dcoord.ClientClosed):
            call()


class Picky(Bank):
    """A participant with the optional validate hook: refuses payloads that are not ints."""

    def validate(self, payload: Any) -> None:
        if not isinstance(payload, int):
            raise dcoord.ConfigError(f"{self.name} takes an int, got {payload!r}")


def test_enlist_runs_the_participant_validate_hook(coordinator: Any) -> None:
    picky, plain = Picky("picky"), Bank("plain")
    coord = coordinator([picky, plain])
    tx = coord.begin()
    with pytest.raises(dcoord.ConfigError, match="takes an int, got 'x'"):
        tx.enlist("picky", "x")
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(dcoord.ConfigError, match=r"'plain'.*Circular reference"):
        tx.enlist("plain", cycle)  # no participant could be sent it, nor the log digest it
    assert tx.payloads == {}
    tx.enlist("picky", 7)
    tx.enlist("plain", {"any": float("nan")})  # plain has no hook: anything digestible
    tx.commit()
    assert tx.txid in picky.committed and tx.txid in plain.committed


def test_crash_after_decision_is_finished_by_recover(coordinator: Any) -> None:
    a, b = banks("a", "b")

    def crash(point: str, txid: str, participant: str | None) -> None:
        if point == "after_commit":
            raise Crash(point)

    dying = coordinator([a, b], failpoint=crash, phase2_timeout=0.2)
    tx = dying.begin()
    tx.enlist("a", None)
    tx.enlist("b", None)
    with pytest.raises(Crash):
        tx.commit()
    assert tx.state == "unknown"
    assert state_of(dying, tx.txid) is TxState.COMMITTING
    # Another coordinator (another process, in real life) finishes the work.
    rescuer = coordinator([a, b])
    assert rescuer.resolve(tx.txid) == "committed"
    report = rescuer.recover()
    assert report.committed == [tx.txid] and report.clean
    assert tx.txid in a.committed and tx.txid in b.committed
    assert state_of(rescuer, tx.txid) is TxState.COMMITTED
    assert rescuer.recover().scanned == 0


def test_crash_before_decision_is_aborted_by_recover_after_the_deadline(coordinator: Any) -> None:
    a, b = banks("a", "b")

    def crash(point: str, txid: str, participant: str | None) -> None:
        if point == "after_prepare":
            raise Crash(point)

    dying = coordinator([a, b], failpoint=crash)
    tx = dying.begin(timeout=0.5)
    tx.enlist("a", None)
    tx.enlist("b", None)
    with pytest.raises(Crash):
        tx.commit()
    rescuer = coordinator([a, b])
    early = rescuer.recover()
    assert early.pending == [tx.txid] and early.actions == 0
    assert rescuer.resolve(tx.txid) == "pending"
    wait_for(lambda: time.time() >= rescuer.get(tx.txid).deadline)  # type: ignore[union-attr]
    # recover() judges by the server's clock (carried forward between its reads), which
    # may trail this one by a little: poll it rather than expect it on the first call.
    reports: list[Any] = []

    def recovered() -> bool:
        reports.append(rescuer.recover())
        return bool(reports[-1].aborted or reports[-1].incomplete)

    wait_for(recovered)
    assert reports[-1].aborted == [tx.txid]
    assert not a.committed and not b.committed
    assert not a.prepared and not b.prepared
    assert rescuer.resolve(tx.txid) == "aborted"


def test_resolve_semantics(coordinator: Any) -> None:
    a = Bank("a")
    gate = threading.Event()
    entered = threading.Event()

    def hold(point: str, txid: str, participant: str | None) -> None:
        if point == "after_record":
            entered.set()
            gate.wait(10)

    coord = coordinator([a], failpoint=hold)
    assert coord.resolve("never-existed") == "aborted"  # presumed abort
    with pytest.raises(dcoord.ConfigError):
        coord.resolve("not a txid")
    tx = coord.begin(timeout=0.6)
    tx.enlist("a", None)
    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(_commit(tx)))
    worker.start()
    assert entered.wait(5)
    assert coord.resolve(tx.txid) == "pending"
    wait_for(lambda: time.time() >= tx.timeout + coord.get(tx.txid).created)  # type: ignore[union-attr]
    assert coord.resolve(tx.txid) == "aborted"  # recorded by compare-and-set, final
    assert state_of(coord, tx.txid) is TxState.ABORTING
    gate.set()
    worker.join(10)
    assert isinstance(outcome[0], dcoord.TransactionAborted)  # the coordinator lost
    assert not a.committed and tx.txid in a.aborted


def _commit(tx: dcoord.Transaction) -> object:
    try:
        return tx.commit()
    except dcoord.TransactionAborted as exc:
        return exc


def _collect(results: list[object], fn: Callable[[Any], object], arg: Any) -> None:
    results.append(fn(arg))


def test_a_lagging_coordinator_clock_does_not_get_its_transactions_aborted(
    coordinator: Any, backend: str
) -> None:
    """A coordinator whose clock lags by more than its timeout used to write deadlines that
    had passed already, so any concurrent recover() aborted its transactions. Deadlines
    are now the backend's clock's; on etcd (no clock) a lag below max_clock_skew is
    tolerated, and the negative control shows that the bound is real."""
    a = Bank("a")
    lag, timeout = (1.5, 1.0) if backend == "etcd" else (3600.0, 10.0)
    for tolerated, expected in [(3.0, "committed"), (0.0, "aborted")]:
        if tolerated == 0.0 and backend != "etcd":
            continue  # a shared clock has no skew to tolerate: nothing to control
        recoverer = coordinator([a], max_clock_skew=tolerated)
        reports: list[dcoord.RecoveryReport] = []

        def meanwhile(
            point: str,
            txid: str,
            participant: str | None,
            r: Any = recoverer,
            into: list[dcoord.RecoveryReport] = reports,
        ) -> None:
            if point == "after_prepare":
                into.append(r.recover())

        lagging = coordinator(
            [a], clock=lambda: time.time() - lag, failpoint=meanwhile, max_clock_skew=tolerated
        )
        tx = lagging.begin(timeout=timeout)
        tx.enlist("a", None)
        outcome = _commit(tx)
        (report,) = reports
        if expected == "committed":
            assert isinstance(outcome, txlog.TxRecord), outcome
            assert report.pending == [tx.txid] and report.aborted == []
            assert tx.txid in a.committed
        else:
            assert isinstance(outcome, dcoord.TransactionAborted), outcome
            assert report.aborted == [tx.txid] and tx.txid not in a.committed


def test_a_coordinator_clock_running_ahead_does_not_extend_its_deadline(
    coordinator: Any, backend: str
) -> None:
    """A coordinator ahead by an hour used to set deadlines an hour late: its prepared
    participants stayed reserved that long after it died. On etcd the tolerated skew
    bounds the extension."""
    a = Bank("a")
    ahead = 0.5 if backend == "etcd" else 3600.0

    def crash(point: str, txid: str, participant: str | None) -> None:
        if point == "after_prepare":
            raise Crash(point)

    dying = coordinator([a], clock=lambda: time.time() + ahead, failpoint=crash)
    tx = dying.begin(timeout=0.5)
    tx.enlist("a", None)
    with pytest.raises(Crash):
        tx.commit()
    rescuer = coordinator([a], max_clock_skew=1.0)
    wait_for(lambda: rescuer.resolve(tx.txid) == "aborted", timeout=10)
    assert rescuer.recover().aborted == [tx.txid]
    assert tx.txid in a.aborted and not a.prepared


def test_racing_deciders_never_record_different_outcomes(coordinator: Any) -> None:
    """Many rounds: a coordinator committing right at its deadline vs resolvers aborting."""
    for _ in range(8):
        a, b = banks("a", "b")
        go = threading.Event()

        def hold(point: str, txid: str, participant: str | None, go: threading.Event = go) -> None:
            if point == "after_record":
                go.wait(10)

        coord = coordinator([a, b], failpoint=hold)
        resolvers = [coordinator([]) for _ in range(3)]
        tx = coord.begin(timeout=0.2)
        tx.enlist("a", None)
        tx.enlist("b", None)
        results: list[object] = []
        threads = [threading.Thread(target=_collect, args=(results, _commit, tx))]
        threads[0].start()
        record = None
        while record is None:
            record = coord.get(tx.txid)
        # Resolvers only once the record exists, as participants ask only after their
        # prepare: asked before, "no record" rightly means abort (presumed abort).
        threads += [
            threading.Thread(target=_collect, args=(results, r.resolve, tx.txid))
            for r in resolvers
            for _ in range(2)
        ]
        for t in threads[1:]:
            t.start()
        # Let everyone loose right at the deadline, so commit and abort race for real.
        time.sleep(max(0.0, record.deadline - time.time()))
        go.set()
        for t in threads:
            t.join(10)
        final = coord.get(tx.txid)
        assert final is not None and final.outcome is not None
        answers = {
            "committed" if isinstance(r, txlog.TxRecord) else r
            for r in results
            if not isinstance(r, dcoord.TransactionAborted)
        }
        if any(isinstance(r, dcoord.TransactionAborted) for r in results):
            answers.add("aborted")
        answers.discard("pending")
        assert answers == {final.outcome}, (answers, final)
        if final.outcome == "committed":
            assert tx.txid in a.committed and tx.txid in b.committed
        else:
            assert not a.committed and not b.committed


def test_store_cas_admits_exactly_one_of_racing_writers(client: dcoord.Client) -> None:
    store = client.backend.txlog
    record = txlog.new_record("race1", {"a": None}, now=time.time(), timeout=30)
    entry = store.create("race1", txlog.encode(record), record.deadline)
    assert entry is not None
    assert store.create("race1", b"again", record.deadline) is None  # create never overwrites
    wins: list[str] = []
    barrier = threading.Barrier(8)

    def decide(i: int) -> None:
        outcome = "committed" if i % 2 else "aborted"
        new = txlog.decide(record, outcome, now=time.time(), reason=str(i))
        barrier.wait()
        data = txlog.encode(new)
        state = new.state.value
        if store.cas("race1", entry, data, finished=False, retention=60, state=state, created=1):
            wins.append(outcome)

    threads = [threading.Thread(target=decide, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(wins) == 1
    current = store.get("race1")
    assert current is not None
    assert txlog.decode("race1", current.data).outcome == wins[0]
    # A stale version is refused even when the state would be the same.
    stale = txlog.encode(record)
    assert (
        store.cas("race1", entry, stale, finished=False, retention=60, state="started", created=1)
        is None
    )


class CountingLog:
    """Stands in for a client's log store and records the size of each ``cas_many``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)  # AttributeError: a store without cas_many
        if name != "cas_many":
            return attr

        def cas_many(requests: list[Any], **options: Any) -> Any:
            self.batches.append(len(requests))
            return attr(requests, **options)

        return cas_many


def test_done_writes_are_gathered_and_close_flushes_them(
    coordinator: Any, client: dcoord.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(twopc, "DONE_LINGER", 60.0)  # only close() ends the gathering
    log = CountingLog(client.backend.txlog)
    monkeypatch.setattr(client.backend, "txlog", log)
    coord = coordinator([Bank("a"), Bank("b")])
    txids = []
    for _ in range(5):
        with coord.transaction() as tx:
            tx.enlist("a", None)
            tx.enlist("b", None)
        txids.append(tx.txid)
    began = time.monotonic()
    coord.close()
    assert time.monotonic() - began < 30, "close() sat out the gathering"
    assert [state_of(coord, t) for t in txids] == [TxState.COMMITTED] * 5
    if hasattr(log.inner, "cas_many"):
        assert log.batches == [5], "five done writes, one round trip"


def test_a_done_write_still_gathered_when_its_process_dies_is_redone_by_recover(
    coordinator: Any, client: dcoord.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not hasattr(client.backend.txlog, "cas_many"):
        pytest.skip("done writes are gathered only where the store batches them (Redis)")
    monkeypatch.setattr(twopc, "DONE_LINGER", 60.0)
    a, b = banks("a", "b")
    coord = coordinator([a, b])
    with coord.transaction() as tx:
        tx.enlist("a", None)
        tx.enlist("b", None)
    assert state_of(coord, tx.txid) is TxState.COMMITTING  # decided; done not written yet
    # As if that process died now: another one finds the decision and finishes it.
    report = coordinator([a, b]).recover()
    assert report.committed == [tx.txid] and report.clean
    assert state_of(coord, tx.txid) is TxState.COMMITTED
    # Had it lived on, its late done write loses to recovery's, harmlessly.
    coord.close()
    record = coord.get(tx.txid)
    assert record is not None and record.state is TxState.COMMITTED
    assert set(record.acks) == {"a", "b"}


class SlowToCommit(Bank):
    """Takes longer than INLINE_BELOW to commit, so phase 2 reaches it from the pool."""

    def commit(self, txid: str) -> None:
        time.sleep(0.002)  # a slow resource, not synchronisation
        super().commit(txid)


def test_done_writes_being_gathered_do_not_hold_up_deliveries(
    coordinator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(twopc, "DONE_LINGER", 60.0)
    coord = coordinator([SlowToCommit("a")], workers=1)
    for _ in range(2):  # the second commit's delivery needs the phase-2 pool's one thread
        committed = threading.Event()

        def commit(committed: threading.Event) -> None:
            with coord.transaction() as tx:
                tx.enlist("a", None)
            committed.set()

        threading.Thread(target=commit, args=(committed,), daemon=True).start()
        assert committed.wait(30), "a delivery waited for the done writes' gathering"
    coord.close()


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_cas_many_applies_each_write_on_its_own(
    real_backend_url: str, namespace: str
) -> None:
    from dcoord.core.twopc_state import Cas

    with dcoord.connect(real_backend_url, namespace=namespace) as client:
        store = client.backend.txlog
        requests = []
        for i in range(3):
            record = txlog.new_record(f"many{i}", {"a": None}, now=time.time(), timeout=30)
            entry = store.create(record.txid, txlog.encode(record), record.deadline)
            assert entry is not None
            decided = txlog.decide(record, "committed", now=time.time())
            expected = entry if i != 1 else dataclasses.replace(entry, data=b"stale")
            requests.append(
                Cas(record.txid, expected, txlog.encode(decided), False, "committing",
                    record.created, "started")
            )  # fmt: skip
        client.backend.redis.script_flush()  # type: ignore[attr-defined]
        replies = store.cas_many(requests, retention=60)  # type: ignore[attr-defined]
        assert [reply is not None for reply in replies] == [True, False, True]
        states = [txlog.decode(r.txid, store.get(r.txid).data).state for r in requests]  # type: ignore[union-attr]
        assert states == [TxState.COMMITTING, TxState.STARTED, TxState.COMMITTING]
        assert store.cas_many([], retention=60) == []  # type: ignore[attr-defined]


def test_redis_log_replaces_a_kept_connection_that_the_server_closed(
    server_factory: Callable[..., Any], namespace: str
) -> None:
    # The log keeps its connections between writes, past redis-py's pool: one the server
    # closed meanwhile (its idle timeout, CLIENT KILL, a restart) is found out before
    # use and replaced, as the pool does, rather than failing the next commit; and a
    # script the server forgot (SCRIPT FLUSH, a restart) is loaded again.
    server = server_factory("redis")
    with dcoord.connect(server.url, namespace=namespace) as client:
        coord = client.coordinator([Bank("a")])
        with coord.transaction() as tx:
            tx.enlist("a", None)
        admin = server.redis_admin()
        try:
            assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
            admin.script_flush()
        finally:
            admin.close()
        with coord.transaction() as tx:
            tx.enlist("a", None)
        record = coord.get(tx.txid)
        assert record is not None and record.outcome == "committed"


def test_invalid_transitions_are_refused_and_leave_the_log_unchanged(
    coordinator: Any, client: dcoord.Client
) -> None:
    a = Bank("a")
    coord = coordinator([a])
    with coord.transaction() as tx:
        tx.enlist("a", None)
    wait_for(lambda: state_of(coord, tx.txid) is TxState.COMMITTED)
    entry = client.backend.txlog.get(tx.txid)
    assert entry is not None
    committed = txlog.decode(tx.txid, entry.data)
    for target in TxState:
        with pytest.raises(dcoord.InvalidTransition):
            txlog.transition(committed, target)
    assert coord.resolve(tx.txid) == "committed"
    assert client.backend.txlog.get(tx.txid) == entry


def test_corrupted_record_is_named_and_recovery_carries_on(
    coordinator: Any, client: dcoord.Client
) -> None:
    a = Bank("a")
    assert client.backend.txlog.create("broken", b"\x00not json", time.time() - 1) is not None

    def crash(point: str, txid: str, participant: str | None) -> None:
        if point == "after_decision":
            raise Crash(point)

    dying = coordinator([a], failpoint=crash)
    tx = dying.begin()
    tx.enlist("a", None)
    with pytest.raises(Crash):
        tx.commit()
    rescuer = coordinator([a])
    with pytest.raises(dcoord.LogCorrupted) as info:
        rescuer.get("broken")
    assert info.value.txid == "broken"
    report = rescuer.recover()
    assert list(report.corrupted) == ["broken"] and "broken" in report.corrupted["broken"]
    assert report.committed == [tx.txid]
    assert tx.txid in a.committed
    assert [r.txid for r in rescuer.transactions()] == [tx.txid]  # listing skips it


def test_recover_reads_only_unfinished_records(coordinator: Any, client: dcoord.Client) -> None:
    a = Bank("a")
    coord = coordinator([a])
    for _ in range(25):
        with coord.transaction() as tx:
            tx.enlist("a", None)
    coord.close()  # waits for the background "done" writes
    store = client.backend.txlog
    reads: list[str] = []
    real_get = store.get

    def counting_get(txid: str) -> Any:
        reads.append(txid)
        return real_get(txid)

    store.get = counting_get  # type: ignore[method-assign]
    try:
        for txid in ("open1", "open2"):
            record = txlog.new_record(txid, {"a": None}, now=time.time(), timeout=60)
            store.create(txid, txlog.encode(record), record.deadline)
        report = coordinator([a]).recover()
    finally:
        del store.get  # type: ignore[method-assign]
    assert report.scanned == 2 and sorted(report.pending) == ["open1", "open2"]
    assert len(reads) <= 2
    assert len(coord.transactions(state="committed")) == 25


@pytest.mark.slow
def test_finished_records_expire_after_retention(coordinator: Any, backend: str) -> None:
    a = Bank("a")
    coord = coordinator([a], retention=1.0)
    with coord.transaction() as tx:
        tx.enlist("a", None)
    wait_for(lambda: state_of(coord, tx.txid) is TxState.COMMITTED)
    finished_at = time.monotonic()
    # etcd grants leases in whole seconds with a ~2 s minimum.
    wait_for(lambda: coord.get(tx.txid) is None, timeout=10)
    assert time.monotonic() - finished_at >= 0.9
    assert coord.resolve(tx.txid) == "aborted"  # forgotten: presumed abort, harmless now


def test_unfinished_records_never_expire(coordinator: Any) -> None:
    a = Bank("a")

    def crash(point: str, txid: str, participant: str | None) -> None:
        raise Crash(point)

    coord = coordinator([a], retention=0.2, failpoint=crash)
    tx = coord.begin()
    tx.enlist("a", None)
    with pytest.raises(Crash):
        tx.commit()
    time.sleep(0.5)  # longer than the retention: the started record must stay
    assert state_of(coord, tx.txid) is TxState.STARTED


def test_durability_requirement(connect: Callable[..., dcoord.Client], backend: str) -> None:
    strict = connect(require_durable=True)
    if backend == "memory":
        with pytest.raises(dcoord.ConfigError, match="require_durable"):
            strict.coordinator(participants=[])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", dcoord.DurabilityWarning)
            # The test servers run with appendfsync always (redis) / Raft WAL (etcd).
            strict.coordinator(participants=[])
            connect().coordinator(participants=[])


@pytest.mark.slow
def test_redis_without_fsync_always_warns_or_refuses(server_factory: Callable[..., Any]) -> None:
    server = server_factory("redis", persistent=False)  # appendonly no
    with (
        dcoord.connect(server.url) as client,
        pytest.warns(dcoord.DurabilityWarning, match="appendonly"),
    ):
        client.coordinator(participants=[])
    with dcoord.connect(server.url, require_durable=True) as client:
        with pytest.raises(dcoord.ConfigError, match="require_durable"):
            client.coordinator(participants=[])
        client.backend.redis.config_set("appendonly", "yes")  # type: ignore[attr-defined]
        client.backend.redis.config_set("appendfsync", "everysec")  # type: ignore[attr-defined]
        with pytest.raises(dcoord.ConfigError, match="appendfsync everysec"):
            client.coordinator(participants=[])


def _durability_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, dcoord.DurabilityWarning)]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
def test_redis_that_may_evict_keys_warns_or_refuses(
    server_factory: Callable[..., Any], policy: str
) -> None:
    """Evicted started/committing records or unfinished index: resolve() would presume
    abort after some participants committed. Evicted locks: two holders. AOF with
    appendfsync always does not help against either."""
    server = server_factory("redis")  # AOF with appendfsync always: only eviction is wrong
    with dcoord.connect(server.url) as admin:
        admin.backend.redis.config_set("maxmemory-policy", policy)  # type: ignore[attr-defined]
        with pytest.warns(dcoord.DurabilityWarning, match=f"maxmemory-policy {policy}"):
            admin.coordinator(participants=[])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            admin.lock("first")
            admin.lock("second", ttl=5).acquire(timeout=5)
        (warned,) = _durability_warnings(caught)  # once per client, at its first lock
        assert policy in warned and "lock" in warned
    with (
        dcoord.connect(server.url, require_durable=True) as strict,
        pytest.raises(dcoord.ConfigError, match=f"require_durable.*{policy}"),
    ):
        strict.coordinator(participants=[])
    # The negative control: the same server without eviction is silent.
    with dcoord.connect(server.url, require_durable=True) as client:
        client.backend.redis.config_set("maxmemory-policy", "noeviction")  # type: ignore[attr-defined]
        with warnings.catch_warnings():
            warnings.simplefilter("error", dcoord.DurabilityWarning)
            client.coordinator(participants=[])
            client.lock("third")


@pytest.mark.slow
def test_redis_durability_check_without_config_permission(
    server_factory: Callable[..., Any],
) -> None:
    """A user denied CONFIG: policy and AOF come from INFO, which does not show
    appendfsync, so the check says plainly that it cannot tell (warns, or refuses)."""
    server = server_factory("redis")
    with dcoord.connect(server.url) as admin:
        admin.backend.redis.execute_command(  # type: ignore[attr-defined]
            "ACL", "SETUSER", "app", "on", ">app-secret", "~*", "&*", "+@all", "-config"
        )
        admin.backend.redis.config_set("maxmemory-policy", "allkeys-lfu")  # type: ignore[attr-defined]
    url = server.url.replace("redis://", "redis://app:app-secret@")
    with dcoord.connect(url) as client:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            client.coordinator(participants=[])
            client.lock("x")
        log_warning, lock_warning = _durability_warnings(caught)
        assert "maxmemory-policy allkeys-lfu" in log_warning
        assert "appendfsync cannot be read" in log_warning and "CONFIG" in log_warning
        assert "allkeys-lfu" in lock_warning
        assert all("app-secret" not in text for text in (log_warning, lock_warning))
    with dcoord.connect(server.url) as admin:
        admin.backend.redis.config_set("maxmemory-policy", "noeviction")  # type: ignore[attr-defined]
    with dcoord.connect(url, require_durable=True) as client:
        with pytest.raises(dcoord.ConfigError, match="appendfsync cannot be read"):
            client.coordinator(participants=[])
        with warnings.catch_warnings():
            warnings.simplefilter("error", dcoord.DurabilityWarning)
            client.lock("y")  # INFO shows the policy: locks are safe


def test_cli_tx_commands(backend_url: str, namespace: str, capsys: Any) -> None:
    from dcoord.cli import main

    with dcoord.connect(backend_url, namespace=namespace) as client:
        kv = dcoord.KVParticipant(client, "kv")

        def crash(point: str, txid: str, participant: str | None) -> None:
            if point == "after_decision":
                raise Crash(point)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dcoord.DurabilityWarning)
            coord = client.coordinator(participants=[kv], failpoint=crash)
        tx = coord.begin()
        tx.enlist("kv", {"set": {"k": 1}})
        with pytest.raises(Crash):
            tx.commit()
        args = ["--url", backend_url, "--namespace", namespace]
        capsys.readouterr()
        assert main(["tx", "list", "--state", "committing", *args]) == 0
        assert tx.txid in capsys.readouterr().out
        assert main(["tx", "show", tx.txid, *args]) == 0
        shown = capsys.readouterr().out
        assert "committing" in shown and "kv" in shown and "not acknowledged" in shown
        assert main(["tx", "resolve", tx.txid, *args]) == 0
        assert capsys.readouterr().out.strip() == "committed"
        assert main(["tx", "recover", *args]) == 1  # kv is not named: cannot finish it
        assert "not known here: kv" in capsys.readouterr().out
        assert main(["tx", "recover", "--kv", "kv", *args]) == 0
        assert kv.get("k") == 1
        assert main(["tx", "show", "no-such-tx", *args]) == 0  # as resolve says: aborted
        assert "presumed aborted" in capsys.readouterr().out
        assert main(["tx", "show", "bad txid!", *args]) == 2


@pytest.mark.parametrize("crash", [False, True])
def test_demo_runs_and_checks_itself(crash: bool, capsys: Any) -> None:
    from dcoord.cli import main

    url = f"memory://demo-{uuid.uuid4().hex[:8]}"
    argv = ["demo", "--url", url, "--accounts", "12", "--transfers", "60", "--seed", "7"]
    started = time.monotonic()
    assert main([*argv, "--crash"] if crash else argv) == 0
    out = capsys.readouterr().out
    assert time.monotonic() - started < 10
    assert "check: total balance 1200 unchanged, nothing in doubt: OK" in out
    assert "ring: 12 accounts over 3 banks" in out and "fence" in out
    if crash:
        for point in ("after record", "after prepare"):
            assert f"died {point}" in out
        assert "recovery: scanned" in out
