"""The lock and fence conformance suites, run a second time on the async API.

The test functions are those of tests/conformance (imported, not copied: the lock,
fair lock and fence suites, and the lock metrics test); here the
``connect`` and ``client`` fixtures (tests/aio/conftest.py) make dcoord.aio clients,
seen through a thin sync adapter, so every assertion holds for both APIs. Left out:
tests of one backend's internals (they poke the sync backend's objects) and the
server-restart test (it connects with dcoord.connect itself).
"""

from __future__ import annotations

from tests.conformance import test_fair_locks, test_fence_write, test_locks, test_metrics
from tests.conformance.test_metrics import readings  # noqa: F401  (the fixture it needs)

SYNC_ONLY = {
    "test_fence_survives_a_server_restart",
}


def _imported() -> dict[str, object]:
    tests: dict[str, object] = {
        "test_lock_grants_waits_timeouts_holds_and_losses": (
            test_metrics.test_lock_grants_waits_timeouts_holds_and_losses
        )
    }
    for module in (test_locks, test_fence_write, test_fair_locks):
        for name, value in vars(module).items():
            backend_specific = name.startswith(("test_redis_", "test_etcd_"))
            wanted = name.startswith("test_") and name not in SYNC_ONLY
            if wanted and callable(value) and not backend_specific:
                tests[name] = value
    return tests


globals().update(_imported())
