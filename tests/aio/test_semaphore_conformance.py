"""The semaphore conformance suite, run a second time on the async API.

The test functions are those of tests/conformance/test_semaphore.py (imported, not
copied); the ``connect`` and ``client`` fixtures (tests/aio/conftest.py) make dcoord.aio
clients seen through the sync adapter (tests/aio/adapter.py). Left out, because they
connect with ``dcoord.connect`` themselves and so test the sync client again: the
``test_redis_*`` tests (key layout, release across a restart, the ACL command list) and
``test_closing_the_client_stops_its_waiters_with_client_closed``. Their async
counterparts are in tests/aio/test_semaphores.py, but the key layout's: the async slots
take their keys from the sync ones' recipes (``semaphore_recipe``, ``rwlock_recipe``).
"""

from __future__ import annotations

from tests.conformance import test_semaphore

SYNC_ONLY = {"test_closing_the_client_stops_its_waiters_with_client_closed"}


def _imported(module: object) -> dict[str, object]:
    return {
        name: value
        for name, value in vars(module).items()
        if name.startswith("test_")
        and not name.startswith(("test_redis_", "test_etcd_"))
        and name not in SYNC_ONLY
        and callable(value)
    }


globals().update(_imported(test_semaphore))
