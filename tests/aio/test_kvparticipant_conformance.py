"""The KVParticipant conformance suite (tests/conformance/test_kvparticipant.py), run on
AsyncKVParticipant and the async coordinator.

The test functions are imported, not copied; for each test the suite's
``KVParticipant`` is replaced by the adapter's :class:`~tests.aio.adapter.SyncKV` (an
AsyncKVParticipant behind sync methods) and ``client`` is an async client seen through
the adapter. Left out: tests that subclass the sync participant to pause it inside its
own steps, or that size the sync coordinator's thread pools.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.aio.adapter import SyncKV, SyncView
from tests.conformance import test_kvparticipant

SYNC_ONLY = {
    # Subclass KVParticipant to pause inside _stage / _wait_unreserved.
    "test_prepare_paused_between_read_and_stage_cannot_stage_from_its_read",
    "test_phase2_is_delivered_while_every_worker_waits_in_prepare",
    # Sizes the sync coordinator's pools (workers=...).
    "test_four_times_workers_contending_transactions_get_phase2_in_time",
}


@pytest.fixture(autouse=True)
def async_participants(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(client: SyncView, name: str, **options: Any) -> SyncKV:
        return SyncKV(client, name, **options)

    monkeypatch.setattr(test_kvparticipant, "KVParticipant", make)


globals().update(
    {
        name: value
        for name, value in vars(test_kvparticipant).items()
        if name.startswith("test_") and callable(value) and name not in SYNC_ONLY
    }
)
