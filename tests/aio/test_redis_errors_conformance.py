"""Redis error replies as typed dcoord errors, run a second time on the async API.

The test functions of tests/conformance/test_redis_errors.py are imported, not copied;
its ``connect`` fixture (imported) connects with ``dcoord_connect``: here dcoord.aio
clients seen through the adapter (tests/aio/adapter.py).

Left out, and why: ``test_follower_denied_its_channel_logs_one_line_without_traceback``
(the async watch's first iteration raises the refusal, docs/asyncio.md, where the sync
watch's follower thread logs it);
``test_primary_short_of_replicas_is_unavailable_not_an_error`` uses only
``client.backend.kv``, through the adapter a sync client's store;
``test_busy_server_is_unavailable_without_retry_and_retried_until_it_answers``,
``test_out_of_memory_is_a_backend_error_and_never_retried``,
``test_other_error_replies_are_backend_errors_quoting_the_reply`` and
``test_nested_calls_do_not_wrap_the_inner_error_again`` drive the sync backend's
``call`` and its redis-py client.
"""

from __future__ import annotations

from tests.conformance import test_redis_errors
from tests.conformance.test_redis_errors import admin, connect, server  # noqa: F401  (fixtures)

SYNC_ONLY = {
    "test_follower_denied_its_channel_logs_one_line_without_traceback",
    "test_primary_short_of_replicas_is_unavailable_not_an_error",
    "test_busy_server_is_unavailable_without_retry_and_retried_until_it_answers",
    "test_out_of_memory_is_a_backend_error_and_never_retried",
    "test_other_error_replies_are_backend_errors_quoting_the_reply",
    "test_nested_calls_do_not_wrap_the_inner_error_again",
}

globals().update(
    {
        name: value
        for name, value in vars(test_redis_errors).items()
        if name.startswith("test_") and callable(value) and name not in SYNC_ONLY
    }
)
