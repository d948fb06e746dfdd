"""The 2PC log paging suite (tests/conformance/test_txlog_paging.py), run on the async API,
and listings of one log shared by a sync and an async coordinator.

The test functions are imported, not copied: the ``client`` fixture is a dcoord.aio client
seen through the adapter (tests/aio/adapter.py), and the suite's records are written
through the async store (:attr:`SyncView.txlog`), so the async store's indexes and the
async coordinator's pages are what they check. Left out: the CLI's and doctor's, which
use the sync API.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import dcoord
from tests.aio.adapter import SyncView
from tests.conformance import test_txlog_paging
from tests.conformance.test_txlog_paging import walk

SYNC_ONLY = {
    # The CLI and the status screen connect with dcoord.connect themselves.
    "test_cli_lists_a_page_and_prints_the_next_cursor",
    "test_doctor_states_the_size_formula_with_what_it_found",
    "test_status_reads_only_the_unfinished_states",
}


@pytest.fixture(autouse=True)
def async_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's records go through the async client's store."""
    monkeypatch.setattr(test_txlog_paging, "store", lambda client: client.txlog)


def _imported() -> dict[str, object]:
    return {
        name: value
        for name, value in vars(test_txlog_paging).items()
        if name.startswith("test_") and callable(value) and name not in SYNC_ONLY
    }


globals().update(_imported())
mixed_log = test_txlog_paging.mixed_log


class Voter:
    """A participant that votes ``vote`` and keeps nothing."""

    def __init__(self, name: str, vote: bool) -> None:
        self.name = name
        self.vote = vote

    def prepare(self, txid: str, payload: Any) -> bool:
        return self.vote

    def commit(self, txid: str) -> None:
        pass

    def abort(self, txid: str) -> None:
        pass


@pytest.fixture
def sync_client(aio_url: str, namespace: str) -> Iterator[dcoord.Client]:
    """A sync client of the async client's log."""
    client = dcoord.connect(aio_url, namespace=namespace)
    yield client
    client.close()


def test_either_api_lists_what_the_other_coordinator_ran(
    client: SyncView, sync_client: dcoord.Client
) -> None:
    # Both drivers of the 2PC core keep the state indexes: each coordinator's committed
    # and aborted transactions appear in both listings, in their states, and a cursor of
    # one API continues on the other.
    voters = [Voter("yes", True), Voter("no", False)]

    def coordinators() -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dcoord.DurabilityWarning)
            return {
                "sync": sync_client.coordinator(voters, max_clock_skew=0.0),
                "async": client.coordinator(voters, max_clock_skew=0.0),
            }

    expected: dict[str, str] = {}
    for coord in coordinators().values():
        for _ in range(2):
            tx = coord.begin()
            tx.enlist("yes")
            tx.commit()
            expected[tx.txid] = "committed"
        tx = coord.begin()
        tx.enlist("yes")
        tx.enlist("no")
        with pytest.raises(dcoord.TransactionAborted):
            tx.commit()
        expected[tx.txid] = "aborted"
        coord.close()  # waits for the background writes that finish the records
    coords = coordinators()
    for coord in coords.values():
        assert {r.txid: r.state.value for r in coord.transactions()} == expected
        for state in ("committed", "aborted"):
            listed = sorted(r.txid for r in coord.transactions(state))
            assert listed == sorted(t for t, s in expected.items() if s == state)
        assert coord.transactions("started") == []
    order = [r.txid for r in coords["sync"].transactions()]
    first = coords["sync"].transactions(limit=2)
    rest = coords["async"].transactions(limit=10, cursor=first.cursor)
    assert [r.txid for r in first] + [r.txid for r in rest] == order
    assert walk(coords["async"], 1, newest_first=True) == order[::-1]
    for coord in coords.values():
        coord.close()
