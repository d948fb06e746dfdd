"""The membership conformance suite, run a second time on the async API.

The test functions are those of tests/conformance/test_membership.py (imported, not
copied); the ``connect`` and ``client`` fixtures (tests/aio/conftest.py) make dcoord.aio
clients seen through the sync adapter (tests/aio/membership_adapter.py). Left out:
tests that freeze a sync client's scheduler (the async equivalents are in
tests/aio/test_membership.py), the ``dcoord members`` command (sync), and one that
connects with dcoord.connect itself.
"""

from __future__ import annotations

from tests.conformance import test_membership

SYNC_ONLY = {
    "test_member_that_stops_heart_beating_disappears_within_its_ttl",
    "test_paused_member_is_marked_lost_and_never_silently_rejoins",
    "test_members_command_lists_live_members",
    "test_members_command_watch_prints_each_change",
    "test_redis_script_is_reloaded_after_script_flush",
}


def _imported() -> dict[str, object]:
    return {
        name: value
        for name, value in vars(test_membership).items()
        if name.startswith("test_") and name not in SYNC_ONLY and callable(value)
    }


globals().update(_imported())
