"""Paging through the 2PC log: cursor, limit, order, state index; retention of finished
records and of their index entries. Records are written through the store as the
coordinator writes them, with chosen creation times, so that the order is known.

tests/aio/test_txlog_paging.py runs these tests on the async API: its coordinators and
its store (:func:`store`) are the async ones, seen through tests/aio/adapter.py."""

from __future__ import annotations

import json
import time
import warnings

import pytest

import dcoord
from dcoord import twopc, txlog
from dcoord.backends.base import TxLogStore
from dcoord.backends.redis.slots import bucket
from dcoord.cli import main
from dcoord.core import twopc_state
from dcoord.txlog import TxRecord, TxState

# Creation times far in the past, a quarter second apart (exact in binary and in etcd's
# microseconds), so the expected order is plain.
BASE = 1_700_000_000.0
FINISHED_PATHS = {
    TxState.STARTED: [],
    TxState.COMMITTING: ["committed"],
    TxState.ABORTING: ["aborted"],
    TxState.COMMITTED: ["committed", "ack"],
    TxState.ABORTED: ["aborted", "ack"],
}


def store(client: dcoord.Client) -> TxLogStore:
    """The log store the records are written and read through (the async run swaps it)."""
    return client.backend.txlog


def write(
    client: dcoord.Client, txid: str, created: float, state: TxState, retention: float = 3600
) -> TxRecord:
    """A record of ``txid`` created at ``created``, moved to ``state`` as the coordinator
    moves it (one compare-and-set per edge)."""
    log = store(client)
    record = txlog.new_record(txid, {"a": None, "b": None}, now=created, timeout=10**6)
    entry = log.create(txid, txlog.encode(record), record.deadline, record.created)
    assert entry is not None
    for step in FINISHED_PATHS[state]:
        if step == "ack":
            record = txlog.acknowledge(record, ["a", "b"])
        else:
            record = txlog.decide(
                record, "committed" if step == "committed" else "aborted", now=created
            )
        entry = log.cas(
            txid,
            entry,
            txlog.encode(record),
            finished=record.state.finished,
            retention=retention,
            state=record.state.value,
            created=record.created,
        )
        assert entry is not None
    assert record.state is state
    return record


def coordinator(client: dcoord.Client, **options: object) -> dcoord.Coordinator:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcoord.DurabilityWarning)
        return client.coordinator(**options)


def walk(
    coord: dcoord.Coordinator, limit: int, *, state: str | None = None, newest_first: bool = False
) -> list[str]:
    """The txids of every page, following the cursors to the end."""
    txids: list[str] = []
    cursor = None
    while True:
        page = coord.transactions(state, limit=limit, cursor=cursor, newest_first=newest_first)
        assert len(page) <= limit
        txids += [r.txid for r in page]
        if page.cursor is None:
            return txids
        assert len(page) == limit  # only a full page says there may be more
        cursor = page.cursor


STATES = list(TxState)


@pytest.fixture
def mixed_log(client: dcoord.Client) -> dict[str, TxRecord]:
    """23 records, every state, some created at the same instant (ties broken by txid)."""
    records = {}
    for i in range(23):
        txid = f"t{22 - i:02d}"  # txid order against creation order, to catch a mix-up
        created = BASE + (i // 3) * 0.25  # three at a time share a creation time
        records[txid] = write(client, txid, created, STATES[i % len(STATES)])
    return records


@pytest.mark.parametrize("limit", [1, 4, 50])
def test_pages_walk_the_log_once_in_either_order_and_by_state(
    client: dcoord.Client, mixed_log: dict[str, TxRecord], limit: int
) -> None:
    coord = coordinator(client)
    order = [r.txid for r in sorted(mixed_log.values(), key=lambda r: (r.created, r.txid))]
    assert walk(coord, limit) == order
    assert walk(coord, limit, newest_first=True) == order[::-1]
    for state in STATES:
        wanted = [t for t in order if mixed_log[t].state is state]
        assert walk(coord, limit, state=state.value) == wanted
        assert walk(coord, limit, state=state, newest_first=True) == wanted[::-1]


def test_the_old_call_still_lists_every_record_oldest_first(
    client: dcoord.Client, mixed_log: dict[str, TxRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(twopc_state, "LIST_PAGE", 4)  # so that it takes several store pages
    coord = coordinator(client)
    everything = coord.transactions()
    assert everything == sorted(mixed_log.values(), key=lambda r: (r.created, r.txid))
    assert everything.cursor is None
    assert coord.transactions("committed") == [
        r for r in everything if r.state is TxState.COMMITTED
    ]


def test_many_records_created_at_one_instant_page_without_loss_or_repeat(
    client: dcoord.Client,
) -> None:
    # More ties than a page holds: the Redis index must read past the cursor's score.
    for i in range(40):
        write(client, f"same{i:02d}", BASE, TxState.STARTED)
    write(client, "later", BASE + 1, TxState.STARTED)
    coord = coordinator(client)
    expected = [f"same{i:02d}" for i in range(40)] + ["later"]
    assert walk(coord, 3) == expected
    assert walk(coord, 7, newest_first=True) == expected[::-1]


def test_a_transaction_moves_between_state_indexes_as_it_runs(client: dcoord.Client) -> None:
    write(client, "moving", BASE, TxState.COMMITTING)
    coord = coordinator(client)

    def where() -> list[str]:
        return [s.value for s in TxState if [r.txid for r in coord.transactions(s)] == ["moving"]]

    assert where() == ["committing"]
    stored = store(client).get("moving")
    assert stored is not None
    record = txlog.acknowledge(txlog.decode("moving", stored.data), ["a", "b"])
    assert store(client).cas(
        "moving",
        stored,
        txlog.encode(record),
        finished=True,
        retention=3600,
        state=record.state.value,
        created=record.created,
    )
    assert where() == ["committed"]


def test_bad_cursor_and_limit_are_config_errors_naming_them(
    client: dcoord.Client, mixed_log: dict[str, TxRecord]
) -> None:
    coord = coordinator(client)
    for cursor in ["nonsense", "1.5:", "inf:t01", "1.5:bad txid!"]:
        with pytest.raises(dcoord.ConfigError, match=r"cursor|transaction id"):
            coord.transactions(limit=2, cursor=cursor)
    for limit in [0, -1, True, 2.5]:
        with pytest.raises(dcoord.ConfigError, match=f"limit must be .*{limit!r}"):
            coord.transactions(limit=limit)  # type: ignore[arg-type]


def test_finished_records_and_their_index_entries_expire_after_retention(
    client: dcoord.Client, backend: str
) -> None:
    # Two records of one Redis bucket: the second one's finish drops the first one's
    # index entry once its record has expired. A negative control keeps long retention.
    first, second = (
        "gone-0",
        next(f"gone-{i}" for i in range(1, 1000) if bucket(f"gone-{i}") == bucket("gone-0")),
    )
    write(client, "kept", BASE, TxState.COMMITTED, retention=3600)
    write(client, first, BASE + 1, TxState.COMMITTED, retention=0.05)
    coord = coordinator(client)
    deadline = time.monotonic() + 60  # etcd's shortest lease is a few seconds
    while store(client).get(first) is not None:
        assert time.monotonic() < deadline, f"{first} outlived its retention"
        time.sleep(0.05)
    write(client, second, BASE + 2, TxState.COMMITTED, retention=3600)
    assert [r.txid for r in coord.transactions("committed")] == ["kept", second]
    # The index itself forgot it (not only the listing, which skips missing records).
    page = store(client).page(["committed"], after=None, limit=10, newest_first=False)
    assert [txid for _, txid, _ in page] == ["kept", second]
    if backend == "redis":
        log = client.backend.txlog
        done = log.state_key(bucket(first), "committed").rsplit(":s:", 1)[0] + ":done"
        assert client.backend.redis.zscore(done, first) is None


def test_default_retention_is_hours_not_a_week(client: dcoord.Client) -> None:
    # A week at 100 transactions/s is ~60 M records (~32 GB of Redis): see
    # docs/transactions.md, "Retention".
    assert coordinator(client).retention == twopc.DEFAULT_RETENTION <= 6 * 3600


def test_cli_lists_a_page_and_prints_the_next_cursor(
    client: dcoord.Client,
    mixed_log: dict[str, TxRecord],
    backend_url: str,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--url", backend_url, "--namespace", namespace]
    order = [r.txid for r in sorted(mixed_log.values(), key=lambda r: (r.created, r.txid))]
    assert main(["tx", "list", "--limit", "5", "--newest", "--json", *args]) == 0
    out, err = capsys.readouterr()
    assert [doc["txid"] for doc in json.loads(out)] == order[::-1][:5]
    cursor = err.split("--cursor '", 1)[1].split("'", 1)[0]
    assert main(["tx", "list", "--limit", "30", "--newest", "--cursor", cursor, *args]) == 0
    out, _ = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()[1:-1]] == order[::-1][5:]
    assert out.splitlines()[-1] == f"{len(order) - 5} transaction(s)"
    assert main(["tx", "list", "--all", "--json", *args]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(order)
    assert main(["tx", "list", "--cursor", "nonsense", *args]) == 2


def test_doctor_states_the_size_formula_with_what_it_found(
    client: dcoord.Client,
    mixed_log: dict[str, TxRecord],
    backend: str,
    backend_url: str,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["doctor", backend_url, "--namespace", namespace, "--json"]) in (0, 1)
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    if backend == "memory":
        assert "txlog size" not in checks  # nothing outlives the process: nothing to size
        return
    size = checks["txlog size"]
    assert size["status"] == "info"
    finished = sum(r.state.finished for r in mixed_log.values())
    assert size["detail"].startswith(f"{len(mixed_log)} record(s) retained, {finished} finished")
    assert "bytes/record x rate x retention" in size["detail"]


def test_status_reads_only_the_unfinished_states(
    client: dcoord.Client,
    mixed_log: dict[str, TxRecord],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `dcoord status` redraws often: reading the finished history (millions of records)
    # for the few unfinished ones would make each screen cost the whole log.
    from dcoord.cli.status import render

    store = client.backend.txlog
    asked: list[str] = []
    page = store.page

    def spy(states: list[str], **options: object) -> object:
        asked.extend(states)
        return page(states, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "page", spy)
    lines = render(client, coordinator(client))
    assert set(asked) == {"started", "committing", "aborting"}
    unfinished = [r for r in mixed_log.values() if not r.state.finished]
    assert f"{len(unfinished)} unfinished transaction(s)" in lines
