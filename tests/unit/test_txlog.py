"""The transaction record state machine and its JSON format (pure: no backend)."""

from __future__ import annotations

import itertools
import json
import os
import random

import pytest

import dcoord
from dcoord import txlog
from dcoord.core import twopc_state as core
from dcoord.txlog import TxState


def started(*names: str, now: float = 1000.0, timeout: float = 30.0) -> txlog.TxRecord:
    return txlog.new_record(
        "tx1", {n: {"n": n} for n in names}, now=now, timeout=timeout, coordinator="h:1"
    )


def test_new_record_is_started_with_deadline_and_digests() -> None:
    record = started("a", "b", now=100.0, timeout=5.0)
    assert record.state is TxState.STARTED
    assert record.participants == ("a", "b")
    assert record.deadline == 105.0
    assert record.outcome is None
    assert record.digests["a"] == txlog.digest({"n": "a"}) != record.digests["b"]
    assert not record.expired(104.9) and record.expired(105.0)


def test_commit_path_collects_acks_then_finishes() -> None:
    record = txlog.decide(started("a", "b", "c"), "committed", now=2.0)
    assert record.state is TxState.COMMITTING and record.decided_at == 2.0
    assert record.outcome == "committed"
    partial = txlog.acknowledge(record, ["b"])
    assert partial.state is TxState.COMMITTING and partial.unacked == ("a", "c")
    done = txlog.acknowledge(partial, ["a", "c"])
    assert done.state is TxState.COMMITTED and done.unacked == ()
    assert done.state.finished and done.outcome == "committed"


def test_abort_path_finishes_as_aborted() -> None:
    record = txlog.decide(started("a"), "aborted", now=2.0, reason="a voted no")
    assert record.state is TxState.ABORTING and record.reason == "a voted no"
    assert txlog.acknowledge(record, ["a"]).state is TxState.ABORTED


def test_every_edge_outside_the_machine_is_refused() -> None:
    allowed = {
        (TxState.STARTED, TxState.COMMITTING),
        (TxState.STARTED, TxState.ABORTING),
        (TxState.COMMITTING, TxState.COMMITTING),
        (TxState.COMMITTING, TxState.COMMITTED),
        (TxState.ABORTING, TxState.ABORTING),
        (TxState.ABORTING, TxState.ABORTED),
    }
    base = started("a")
    for src, dst in itertools.product(TxState, TxState):
        record = txlog.TxRecord(**{**base.__dict__, "state": src})
        if (src, dst) in allowed:
            assert txlog.transition(record, dst).state is dst
        else:
            with pytest.raises(dcoord.InvalidTransition) as info:
                txlog.transition(record, dst)
            assert info.value.current == src.value and info.value.requested == dst.value


def test_a_decision_is_final() -> None:
    committing = txlog.decide(started("a"), "committed", now=1.0)
    with pytest.raises(dcoord.InvalidTransition):
        txlog.decide(committing, "aborted", now=2.0)
    aborting = txlog.decide(started("a"), "aborted", now=1.0)
    with pytest.raises(dcoord.InvalidTransition):
        txlog.decide(aborting, "committed", now=2.0)


def test_acknowledging_an_unknown_participant_is_refused() -> None:
    record = txlog.decide(started("a"), "committed", now=1.0)
    with pytest.raises(dcoord.ConfigError, match="'zz'"):
        txlog.acknowledge(record, ["zz"])


def test_encode_decode_round_trip() -> None:
    record = txlog.acknowledge(txlog.decide(started("a", "b"), "committed", now=3.5), ["a"])
    data = txlog.encode(record)
    assert json.loads(data)["v"] == txlog.SCHEMA_VERSION
    assert txlog.decode("tx1", data) == record


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"v": 99}', "schema version 99"),
        (b'{"v": 1, "txid": "tx1"}', "bad field"),
    ],
)
def test_garbage_raises_log_corrupted_naming_the_txid(data: bytes, detail: str) -> None:
    with pytest.raises(dcoord.LogCorrupted, match=detail) as info:
        txlog.decode("tx1", data)
    assert info.value.txid == "tx1"
    assert "tx1" in str(info.value)


def test_bad_fields_are_corruption_not_crashes() -> None:
    good = json.loads(txlog.encode(started("a")))
    for field, value in [
        ("state", "exploded"),
        ("participants", "a"),
        ("participants", []),
        ("acks", ["zz"]),
        ("deadline", "soon"),
        ("created", True),
        ("txid", "other"),
    ]:
        doc = {**good, field: value}
        with pytest.raises(dcoord.LogCorrupted):
            txlog.decode("tx1", json.dumps(doc).encode())


def test_txid_and_state_validation_names_the_value() -> None:
    for bad in ["", "a b", "x" * 129, "/etc", 7]:
        with pytest.raises(dcoord.ConfigError, match="transaction id"):
            txlog.check_txid(bad)
    assert txlog.check_state("aborting") is TxState.ABORTING
    with pytest.raises(dcoord.ConfigError, match="'nope'"):
        txlog.check_state("nope")


def test_a_record_needs_participants() -> None:
    with pytest.raises(dcoord.ConfigError, match="no participants"):
        txlog.new_record("tx1", {}, now=0.0, timeout=1.0)


def test_a_payload_the_digest_cannot_walk_is_a_config_error() -> None:
    loop: dict[str, object] = {}
    loop["again"] = loop
    with pytest.raises(dcoord.ConfigError, match=r"payload for 'a'.*Circular"):
        txlog.digest(loop, what="the payload for 'a'")
    with pytest.raises(dcoord.ConfigError, match="payload"):
        txlog.new_record("tx1", {"a": loop}, now=0.0, timeout=1.0)
    # What JSON cannot hold but repr can (NaN, objects) still has a stable digest.
    assert txlog.digest({"x": float("nan")}) == txlog.digest({"x": float("nan")})


def test_run_many_drives_log_programs_side_by_side() -> None:
    """One answer call per round for every program still running; a failed request is
    thrown into its own program only, and one program's error does not stop the others."""

    def program(name: str, rounds: int) -> core.Steps[str]:
        for i in range(rounds):
            try:
                yield core.Read(f"{name}{i}")
            except dcoord.BackendUnavailable:
                if name == "fails":
                    raise
                return f"{name} recovered"
        return f"{name} done"

    calls: list[list[str]] = []

    def answer_all(requests: list[core.Request]) -> list[object]:
        txids = [r.txid for r in requests if isinstance(r, core.Read)]
        calls.append(txids)
        return [dcoord.BackendUnavailable(t) if t.endswith("1") and t[0] != "a" else None
                for t in txids]  # fmt: skip

    results = core.run_many(
        [program("a", 3), program("b", 3), program("fails", 3), program("c", 0)], answer_all
    )
    assert calls == [["a0", "b0", "fails0"], ["a1", "b1", "fails1"], ["a2"]]
    assert results[:2] == ["a done", "b recovered"]
    assert isinstance(results[2], dcoord.BackendUnavailable)
    assert results[3] == "c done"


def test_every_version_encodes_as_its_fields_whether_or_not_it_carries_a_head() -> None:
    """new_record() makes the fixed fields' JSON once and every transition carries it;
    a record read back from the log has none: both encode the same record."""
    versions = [started("a", "b")]
    versions.append(txlog.decide(versions[-1], "aborted", now=2.5, reason='a said "no"'))
    versions.append(txlog.acknowledge(versions[-1], ["a"]))
    versions.append(txlog.acknowledge(versions[-1], ["b"]))
    for record in versions:
        assert record.head, "the head is carried to every later version"
        data = txlog.encode(record)
        decoded = txlog.decode("tx1", data)
        assert decoded == record and not decoded.head
        assert txlog.encode(decoded) == data
        fields = json.loads(data)
        assert fields["state"] == record.state.value and fields["acks"] == list(record.acks)
        assert fields["digests"] == dict(record.digests) and fields["reason"] == record.reason


def test_given_digests_are_recorded_as_given_and_must_cover_the_payloads() -> None:
    record = txlog.new_record("tx1", {"a": 1, "b": 2}, now=0.0, timeout=1.0,
                              digests={"a": "da", "b": "db"})  # fmt: skip
    assert record.digests == {"a": "da", "b": "db"}
    assert json.loads(txlog.encode(record))["digests"] == {"a": "da", "b": "db"}
    with pytest.raises(dcoord.ConfigError, match="digests for"):
        txlog.new_record("tx1", {"a": 1, "b": 2}, now=0.0, timeout=1.0, digests={"a": "da"})


def test_a_transition_changes_only_what_may_change() -> None:
    with pytest.raises(dcoord.ConfigError, match="changes only"):
        txlog.transition(started("a"), TxState.COMMITTING, deadline=5.0)


def test_txids_are_32_hex_digits_and_ignore_the_applications_random_seed() -> None:
    # Transaction ids must not come from the global generator: two processes that seed
    # it alike (tests often do) would make the same ids.
    random.seed(7)
    first = core.new_txid()
    random.seed(7)
    second = core.new_txid()
    assert first != second
    for txid in (first, second):
        assert txlog.check_txid(txid) == txid
        assert len(txid) == 32 and int(txid, 16) >= 0


def test_txids_read_no_os_randomness_per_transaction(monkeypatch: pytest.MonkeyPatch) -> None:
    # os.urandom releases the GIL: with threads committing, every release handed the
    # GIL to another thread, a thread switch per transaction (uuid4 read it each time).
    reads: list[int] = []
    real = os.urandom
    monkeypatch.setattr(os, "urandom", lambda n: reads.append(n) or real(n))
    txids = {core.new_txid() for _ in range(1_000)}
    assert len(txids) == 1_000
    assert reads == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_does_not_repeat_its_parents_txids() -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out without running pytest's teardown
        try:
            os.write(write_end, " ".join(core.new_txid() for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = pipe.read().decode().split()
    os.waitpid(pid, 0)
    parent = [core.new_txid() for _ in range(3)]
    assert len(child) == 3
    assert not set(child) & set(parent)
