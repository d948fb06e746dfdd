"""The documented Redis ACL rule, run a second time on the async API.

The test functions of tests/conformance/test_redis_acl.py are imported, not copied;
its ``connect`` fixture (imported) connects with ``dcoord_connect``: here dcoord.aio
clients seen through the adapter (tests/aio/adapter.py).

Left out, and why: ``test_dcoord_acl_redis_prints_the_verified_rule`` (the CLI, sync
only) and ``test_a_script_denied_a_later_command_changes_nothing`` (it drives the sync
backend's ``txlog`` and ``kv`` stores).
"""

from __future__ import annotations

from tests.conformance import test_redis_acl
from tests.conformance.test_redis_acl import admin, connect, server  # noqa: F401  (fixtures)

SYNC_ONLY = {
    "test_dcoord_acl_redis_prints_the_verified_rule",
    "test_a_script_denied_a_later_command_changes_nothing",
}

globals().update(
    {
        name: value
        for name, value in vars(test_redis_acl).items()
        if name.startswith("test_") and callable(value) and name not in SYNC_ONLY
    }
)
