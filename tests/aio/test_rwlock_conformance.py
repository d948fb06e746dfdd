"""The read-write lock conformance suite, run a second time on the async API.

The test functions are those of tests/conformance/test_rwlock.py (imported, not
copied), on dcoord.aio clients seen through the sync adapter (tests/aio/adapter.py).
Left out: ``test_redis_keys_of_an_rwlock_share_one_cluster_slot``, which connects with
``dcoord.connect`` itself (the async slots take their keys from the sync slots'
``rwlock_recipe``).
"""

from __future__ import annotations

from tests.aio.test_semaphore_conformance import _imported
from tests.conformance import test_rwlock

globals().update(_imported(test_rwlock))
