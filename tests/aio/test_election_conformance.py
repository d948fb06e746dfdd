"""The leader election conformance suite, run a second time on the async API.

The test functions are those of tests/conformance/test_election.py (imported, not
copied); the ``connect`` and ``client`` fixtures (tests/aio/conftest.py) make dcoord.aio
clients seen through the sync adapter (tests/aio/adapter.py: SyncElection). Nothing is
left out. Adapted rather than native: ``client.scheduler.close()`` (a client's leaders
go silent) cancels the async leaderships' renewal tasks, and ``watch(42)``'s refusal is
the adapter's, since the async watch is an iterator that takes no callback.
"""

from __future__ import annotations

from tests.conformance import test_election


def _imported() -> dict[str, object]:
    return {
        name: value
        for name, value in vars(test_election).items()
        if name.startswith("test_") and callable(value)
    }


globals().update(_imported())
