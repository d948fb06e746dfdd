"""Pure helpers of the Redis lock store: TTL rounding and "did the server answer"."""

from __future__ import annotations

import redis

from dcoord.backends.redis.locks import answered, milliseconds
from dcoord.errors import BackendError, BackendUnavailable


def test_ttls_round_up_to_whole_milliseconds() -> None:
    assert milliseconds(30.0) == 30_000
    assert milliseconds(1.0005) == 1001  # round() gave 1000: shorter than believed
    assert milliseconds(0.0025) == 3
    assert milliseconds(0.0001) == 1


def mapped(cause: BaseException, error: type[Exception]) -> Exception:
    try:
        raise error("mapped at the boundary") from cause
    except error as exc:
        return exc


def test_answered_tells_error_replies_from_lost_replies() -> None:
    # The server replied: the command ran to its end or not at all.
    assert answered(redis.ResponseError("BUSY Redis is busy running a script"))
    assert answered(redis.BusyLoadingError("LOADING Redis is loading the dataset"))
    assert answered(mapped(redis.ResponseError("NOPERM"), BackendError))
    assert answered(mapped(redis.ResponseError("READONLY"), BackendUnavailable))
    # No reply: the command may have run, or may still run.
    assert not answered(redis.ConnectionError("Connection reset by peer"))
    assert not answered(redis.TimeoutError("Timeout reading from socket"))
    assert not answered(mapped(redis.TimeoutError("Timeout"), BackendUnavailable))
    assert not answered(KeyboardInterrupt())
