"""Counting semaphores on Redis (Redisson's permit-expirable semaphore), and the slot that
read-write locks share.

Keys of semaphore ``NAME`` (percent-encoded as lock names are) share one hash tag::

    dcoord:<ns>:sem:{NAME}             sorted set: permit id -> expiry (ms, server TIME)
    dcoord:<ns>:sem:{NAME}:fence       the last fence handed out (never expires)
    dcoord:<ns>:sem:{NAME}:released    pub/sub channel releases are published on

The acquire script first reclaims expired permits (by the server's clock only), then
grants one if fewer than ``limit`` are held, with the next fence; else it returns the
time until the first permit expires as a wait hint. A waiter wakes on a release message
or at that hint, whichever comes first, through the client's one lock notifier (one
pub/sub connection for every lock, semaphore and rwlock waiter of the client).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import secrets
import time
from importlib import resources
from typing import TYPE_CHECKING

from ...errors import BackendUnavailable
from ..base import LockGrant, key_segment
from .locks import LuaScript

if TYPE_CHECKING:
    from . import RedisBackend


def recipe_script(name: str) -> LuaScript:
    """``<name>.lua`` after the shared ``next_fence.lua`` prefix, as one script."""
    files = resources.files(__package__)
    prefix = files.joinpath("next_fence.lua").read_text()
    return LuaScript(prefix + files.joinpath(f"{name}.lua").read_text())


SEMAPHORE = recipe_script("semaphore")


def milliseconds(seconds: float) -> int:
    """A TTL in ms, rounded up: the server never lets go before the client thinks."""
    return max(1, math.ceil(seconds * 1000))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What the slots of one semaphore, or one side of an rwlock, run (sync and async
    slots alike, so they share keys and scripts): one Lua script whose every call sends
    ``[operation, id, ttl ms, *extra]`` on ``keys``. ``give_up`` names an operation run
    when a wait ends without a grant (a writer withdrawing its claim). ``wakes_all``: a
    release may admit several waiters (an rwlock writer's), so it must wake every one;
    a semaphore's frees one permit (the async slots wake one waiter then)."""

    script: LuaScript
    keys: tuple[str, ...]
    channel: str
    what: str
    acquire_op: str
    release_op: str
    extend_op: str
    extra: tuple[object, ...] = ()
    give_up: str | None = None
    wakes_all: bool = False

    def args(self, op: str, token: str, ttl: float) -> list[object]:
        return [op, token, milliseconds(ttl), *self.extra]

    def retry_in(self, result: int, ttl: float) -> float:
        """How long a waiter sleeps after the refusal ``result`` unless a release wakes
        it: the hint (a holder's expiry) is the backstop for a lost message; a third of
        the TTL re-arms a waiting writer's claim in time."""
        return min(-result / 1000 + 0.001, ttl / 3)


def semaphore_recipe(prefix: str, name: str, limit: int) -> Recipe:
    """The keys, channel and operations of semaphore ``name`` (see the module doc)."""
    base = f"{prefix}sem:{{{key_segment(name)}}}"
    channel = f"{base}:released"
    return Recipe(
        SEMAPHORE,
        (base, f"{base}:fence"),
        channel,
        f"semaphore {name!r}",
        "acquire",
        "release",
        "extend",
        extra=(limit, channel),
    )


class ScriptSlot:
    """One handle's grant of a semaphore or rwlock: a :class:`~dcoord.backends.base.LockSlot`
    whose steps are operations of its :class:`Recipe`'s Lua script."""

    def __init__(self, backend: RedisBackend, recipe: Recipe, ttl: float) -> None:
        self._backend = backend
        self._recipe = recipe
        self.keys = list(recipe.keys)
        self.channel = recipe.channel
        self._what = recipe.what
        self._ttl = ttl
        self._acquire_op, self._release_op, self._extend_op = (
            recipe.acquire_op,
            recipe.release_op,
            recipe.extend_op,
        )
        self._give_up = recipe.give_up
        self._token: str | None = None
        self._fence = 0

    def _eval(self, op: str, token: str, ttl: float) -> int:
        """One run of the script, redis errors raw (for :meth:`RedisBackend.call`)."""
        args = self._recipe.args(op, token, ttl)
        return int(self._recipe.script(self._backend.redis, self.keys, args))

    def _run(self, op: str, token: str, ttl: float, *, retry: bool = False) -> int:
        return self._backend.call(
            lambda: self._eval(op, token, ttl), what=f"{op} {self._what}", retry=retry
        )

    def acquire(self, deadline: float | None) -> LockGrant | None:
        token = secrets.token_hex(16)  # one id per grant: an old one can never act
        result, sent = self._try(token)
        if result <= 0:
            if deadline is None or time.monotonic() < deadline:
                result, sent = self._wait(token, deadline)
            if result <= 0:
                if self._give_up is not None:
                    self._run(self._give_up, token, self._ttl, retry=True)
                return None
        self._token, self._fence = token, result
        return LockGrant(result, sent + self._ttl)

    def _try(self, token: str) -> tuple[int, float]:
        sent = time.monotonic()
        try:
            return self._run(self._acquire_op, token, self._ttl), sent
        except BaseException:
            # The script may have run before the connection broke: undo it if so, rather
            # than hold a permit nobody knows of until its TTL.
            for undo in (self._release_op, self._give_up):
                if undo is not None:
                    with contextlib.suppress(Exception):
                        self._run(undo, token, self._ttl)
            raise

    def _wait(self, token: str, deadline: float | None) -> tuple[int, float]:
        notifier = self._backend.locks.notifier
        with notifier.interest(self.channel) as channel:
            while True:
                # A closed notifier (the client is closing) wakes every wait at once, and
                # redis-py would reconnect for each try: stop instead of spinning.
                if notifier._closed:
                    raise BackendUnavailable(f"wait for {self._what}: the client is closing")
                # Read the generation before trying: a release published after the try
                # then changes it, so the wait below cannot miss it.
                seen = channel.generation
                result, sent = self._try(token)
                if result > 0:
                    return result, sent
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return 0, sent
                wait = self._recipe.retry_in(result, self._ttl)
                if deadline is not None:
                    wait = min(wait, deadline - now)
                notifier.wait(channel, seen, wait)

    def release(self) -> bool:
        token, self._token = self._token, None
        if token is None:
            return False
        attempts = 0

        def release() -> int:
            nonlocal attempts
            attempts += 1
            # Raw errors: call() retries them (a mapped BackendUnavailable it would not).
            return self._eval(self._release_op, token, self._ttl)

        released = self._backend.call(release, what=f"release {self._what}", retry=True)
        # A retry that finds nothing may follow a first attempt whose reply was lost.
        return bool(released) or attempts > 1

    def extend(self, ttl: float) -> LockGrant | None:
        token = self._token
        if token is None:
            return None
        sent = time.monotonic()
        extended = self._run(self._extend_op, token, ttl)
        return LockGrant(self._fence, sent + ttl) if extended else None


class RedisSemaphores:
    """The semaphore store of one Redis backend."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend

    def slot(self, name: str, limit: int, ttl: float, auto_renew: bool) -> ScriptSlot:
        return ScriptSlot(self._backend, semaphore_recipe(self._backend.prefix, name, limit), ttl)
