"""The 2PC conformance suite (tests/conformance/test_twopc.py), run on the async API.

The test functions are imported, not copied: the ``coordinator`` and ``client`` fixtures
here are dcoord.aio coordinators and clients seen through the adapter
(tests/aio/adapter.py), whose test participants answer on threads. Left out: what
depends on the sync coordinator's internals or on its own connections.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest

import dcoord
from tests.aio.adapter import SyncCoordinator, SyncView
from tests.conformance import test_twopc

SYNC_ONLY = {
    # Asks fast participants inline and reads coord._pace: through the adapter every
    # participant answers from a thread, never within INLINE_BELOW.
    "test_a_fast_participant_that_stalls_past_the_deadline_is_still_aborted",
    # Servers and the CLI of the sync API (they connect with dcoord.connect themselves).
    "test_redis_without_fsync_always_warns_or_refuses",
    "test_redis_that_may_evict_keys_warns_or_refuses",
    "test_redis_durability_check_without_config_permission",
    "test_cli_tx_commands",
    "test_demo_runs_and_checks_itself",
}


@pytest.fixture
def coordinator(client: SyncView) -> Callable[..., SyncCoordinator]:
    def make(participants: list[Any], **options: Any) -> SyncCoordinator:
        options.setdefault("max_clock_skew", 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dcoord.DurabilityWarning)
            return client.coordinator(participants=participants, **options)

    return make


def _imported() -> dict[str, object]:
    return {
        name: value
        for name, value in vars(test_twopc).items()
        if name.startswith("test_") and callable(value) and name not in SYNC_ONLY
    }


globals().update(_imported())
