"""Leader elections on Redis: a leader record written atomically with its grant.

Keys of election ``NAME`` (``%``, ``/``, ``{``, ``}`` percent-encoded) share a hash tag::

    dcoord:<ns>:election:{NAME}          hash {token, term, value}, with the leader's TTL
    dcoord:<ns>:election:{NAME}:term     the last term handed out (never expires)
    dcoord:<ns>:election:{NAME}:changed  pub/sub channel told of every change

Every step is one run of ``election.lua``: campaign grants the record and the next term
(the lock's fence formula) and publishes; extend, proclaim and resign act only while the
candidate's random token still holds the record. Candidates and watchers wait on the
channel through the client's one lock notifier, with the leader's TTL as the backstop
for a leader that expires silently.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from typing import TYPE_CHECKING, Any

from ..base import LockGrant, key_segment
from ..election_base import LeaderRecord
from .locks import NO_HINT_WAIT, LuaScript

if TYPE_CHECKING:
    from . import RedisBackend

ELECTION = LuaScript.named("election")


def election_keys(prefix: str, name: str) -> tuple[str, str, str]:
    """The record key, the term key and the channel of election ``name``."""
    base = f"{prefix}election:{{{key_segment(name)}}}"
    return base, f"{base}:term", f"{base}:changed"


class RedisElections:
    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend
        self.redis = backend.redis
        self.prefix = backend.prefix

    def keys(self, name: str) -> tuple[str, str, str]:
        """The record key, the term key and the channel of election ``name``."""
        return election_keys(self.prefix, name)

    def candidate(self, name: str, ttl: float, value: bytes) -> RedisCandidate:
        return RedisCandidate(self, name, ttl, value)

    def leader(self, name: str) -> LeaderRecord | None:
        record, _, _ = self.keys(name)

        def read() -> Any:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hmget(record, "term", "value")
            pipe.pttl(record)
            return pipe.execute()

        (term, value), pttl = self.backend.call(
            read, what=f"read the leader of {name!r}", retry=True
        )
        if term is None:
            return None
        return LeaderRecord(int(term), bytes(value or b""), pttl / 1000 if pttl >= 0 else None)

    def subscribe(self, name: str) -> RedisSubscription:
        return RedisSubscription(self, self.keys(name)[2])

    def close(self) -> None:
        """Stop the client's notifier (shared with locks; idempotent): only at client close."""
        self.backend.locks.notifier.close()


class RedisCandidate:
    def __init__(self, elections: RedisElections, name: str, ttl: float, value: bytes) -> None:
        self._elections = elections
        self._call = elections.backend.call
        self.name = name
        self.record, self.term_key, self.channel = elections.keys(name)
        self._ttl = ttl
        self._value = value
        self._token: str | None = None
        self._term = 0

    def _run(self, step: str, token: str, ms: int, value: bytes = b"") -> Any:
        return ELECTION(
            self._elections.redis,
            [self.record, self.term_key],
            [step, token, ms, value, self.channel],
        )

    def _try(self, token: str) -> tuple[int, float]:
        sent = time.monotonic()
        ms = max(1, round(self._ttl * 1000))
        try:
            result = self._call(
                lambda: self._run("campaign", token, ms, self._value),
                what=f"campaign in election {self.name!r}",
            )
        except BaseException:
            # The script may have run before the connection broke: resign if so.
            # Best effort: the TTL frees it otherwise; the caller sees the first error.
            with contextlib.suppress(Exception):
                self._run("resign", token, 0)
            raise
        return int(result), sent

    def acquire(self, deadline: float | None) -> LockGrant | None:
        token = secrets.token_hex(16)
        notifier = self._elections.backend.locks.notifier
        with notifier.interest(self.channel) as channel:
            while True:
                # The generation is read before trying: a change published after the
                # try moves it, so the wait below cannot miss it.
                seen = channel.generation
                result, sent = self._try(token)
                if result > 0:
                    self._token, self._term = token, result
                    return LockGrant(result, sent + self._ttl)
                hint = -result / 1000 + 0.001 if result < 0 else NO_HINT_WAIT
                now = time.monotonic()
                if deadline is not None:
                    if now >= deadline:
                        return None
                    hint = min(hint, deadline - now)
                notifier.wait(channel, seen, hint)

    def release(self) -> bool:
        token, self._token = self._token, None
        if token is None:
            return False
        attempts = 0

        def resign() -> Any:
            nonlocal attempts
            attempts += 1
            return self._run("resign", token, 0)

        resigned = self._call(resign, what=f"resign from election {self.name!r}", retry=True)
        # A retry that finds nothing may follow a first attempt whose reply was lost.
        return bool(resigned) or attempts > 1

    def extend(self, ttl: float) -> LockGrant | None:
        token = self._token
        if token is None:
            return None
        sent = time.monotonic()
        ms = max(1, round(ttl * 1000))
        extended = self._call(
            lambda: self._run("extend", token, ms), what=f"renew leadership of {self.name!r}"
        )
        return LockGrant(self._term, sent + ttl) if extended else None

    def proclaim(self, value: bytes) -> bool:
        token = self._token
        if token is None:
            return False
        # Safe to retry: writing the same value twice is one change of value.
        done = self._call(
            lambda: self._run("proclaim", token, 0, value),
            what=f"proclaim in election {self.name!r}",
            retry=True,
        )
        if done:
            self._value = value
        return bool(done)


class RedisSubscription:
    """A watcher's interest in the election's channel, on the client's one notifier."""

    def __init__(self, elections: RedisElections, channel: str) -> None:
        self._notifier = elections.backend.locks.notifier
        self._interest = self._notifier.interest(channel)
        self._channel = self._interest.__enter__()
        self._seen = self._channel.generation

    def wait(self, timeout: float) -> None:
        self._notifier.wait(self._channel, self._seen, timeout)
        self._seen = self._channel.generation

    def wake(self) -> None:
        # Bumping the generation is exactly what a message on the channel does.
        cond = self._notifier._cond
        with cond:
            self._channel.generation += 1
            cond.notify_all()

    def close(self) -> None:
        self._interest.__exit__(None, None, None)
