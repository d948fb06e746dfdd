"""Leader election: :class:`Election` (``client.election(name)``) and :class:`Leadership`.

The semantics live here once, as :mod:`dcoord.lock`'s do for locks: validation, the
conservative client-side deadline behind :attr:`Leadership.held`, renewal on the client's
scheduler thread, ``on_lost``, the context manager and the watch thread. Backends provide
a candidate slot per campaign (a lock slot whose fence is the *term*, plus proclaim), a
read of the current leader and change notifications (see
:mod:`dcoord.backends.election_base`).

A term strictly increases with every new leader of one election, on every backend and
across server restarts: it is the fence for whatever a leader writes
(``client.fence(resource).admit(leadership.term)``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from .backends.base import LockGrant
from .backends.election_base import CandidateSlot
from .core.election import (
    TTL_PASSED,
    WATCH_RETRY,
    leader_of,
    lost_in_block_error,
    not_held_error,
    not_held_reason,
    replaced_error,
    value_bytes,
    watch_wait,
)
from .core.election import (
    Leader as Leader,  # re-exported: dcoord.election.Leader is public
)
from .core.lockstate import after_renewal, conservative
from .errors import BackendUnavailable, ConfigError, DcoordError
from .lock import (
    DEFAULT_TTL,
    RENEW_FRACTION,
    validate_name,
    validate_timeout,
    validate_ttl,
)
from .perkey import PerKey
from .scheduler import Job, JobResult

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("dcoord.election")

OnLeadershipLost = Callable[["Leadership"], object]


class Leadership:
    """This process leading one election; made by :meth:`Election.campaign`.

    Renewed every ``ttl / 3`` on the client's scheduler thread. When renewal fails until
    the TTL passed, or the server no longer has this leader, it turns *lost*: :attr:`held`
    is False and ``on_lost`` is called with it (on the scheduler thread; keep it short).
    As a context manager it resigns on exit, and raises :class:`~dcoord.LockLost` after a
    clean block during which leadership was lost.
    """

    def __init__(
        self,
        election: Election,
        slot: CandidateSlot,
        grant: LockGrant,
        value: bytes,
        ttl: float,
        on_lost: OnLeadershipLost | None,
    ) -> None:
        self.election = election
        self.term = grant.fence
        self.ttl = ttl
        self._slot = slot
        self._raw = value
        self._on_lost = on_lost
        # _mutex guards the state and is never held across a network call; _op serialises
        # the slot's calls (user calls and renewal).
        self._mutex = threading.Lock()
        self._op = threading.Lock()
        self._expires_at = conservative(grant, ttl).expires_at
        self._resigned = False
        self._lost_reason: str | None = None
        self._job: Job = election.client.scheduler.every(
            ttl * RENEW_FRACTION, self._renew, name=f"dcoord election {election.name!r}"
        )

    @property
    def value(self) -> str:
        """The value this leader campaigned with or last proclaimed."""
        return self._raw.decode(errors="replace")

    @property
    def held(self) -> bool:
        """True while this process leads by a conservative client-side clock; never errs
        towards True (False after resign, loss, or a TTL that passed unrenewed)."""
        return self._not_held() is None

    def _not_held(self) -> str | None:
        with self._mutex:
            return not_held_reason(
                self._resigned, self._lost_reason, self._expires_at, time.monotonic()
            )

    def _require_held(self, what: str) -> None:
        reason = self._not_held()
        if reason is not None:
            raise not_held_error(self.election.name, self.term, what, reason)

    def proclaim(self, value: str | bytes) -> None:
        """Change the leader's value (followers see it); the term stays the same.

        Raises LockNotOwned, writing nothing, if this process does not lead any more.
        """
        data = value_bytes(value)
        self._require_held("proclaim")
        with self._op:
            done = self._slot.proclaim(data)
        if not done:
            self._lose("the server no longer has this leader")
            raise replaced_error(self.election.name, self.term)
        self._raw = data

    def resign(self) -> bool:
        """Stop leading now, so another candidate is elected without waiting for the TTL.

        True if this process led until the resignation (so nobody else led during its
        term); False if leadership was already lost (or resigned): then nothing of anyone
        else's is deleted. Idempotent.
        """
        with self._mutex:
            if self._resigned:
                return False
            self._resigned = True
            lost = self._lost_reason is not None or time.monotonic() >= self._expires_at
        self._job.cancel()
        self.election._registry.discard(self)
        with self._op:
            released = self._slot.release()
        return released and not lost

    def _renew(self) -> JobResult:
        with self._mutex:
            if self._resigned or self._lost_reason is not None:
                return False
            expires_at = self._expires_at
        if time.monotonic() >= expires_at:
            self._lose(TTL_PASSED)
            return False
        new: LockGrant | None = None
        failure: DcoordError | None = None
        try:
            with self._op:
                with self._mutex:
                    if self._resigned:
                        return False
                new = self._slot.extend(self.ttl)
        except DcoordError as exc:
            failure = exc
        # The lock's rules (dcoord.core.lockstate), as the async leadership's: a failure
        # is retried until the deadline; an answer after it does not make us lead again.
        now = time.monotonic()
        outcome = after_renewal(LockGrant(self.term, expires_at), self.ttl, now, new, failure)
        if outcome.lost is not None:
            self._lose(outcome.lost)
            return False
        assert outcome.due is not None
        if outcome.retrying:
            log.warning("election %r: renewal failed, retrying: %s", self.election.name, failure)
            return outcome.due - now
        assert outcome.grant is not None
        with self._mutex:
            self._expires_at = outcome.grant.expires_at
        return None

    def _lose(self, reason: str) -> None:
        with self._mutex:
            if self._resigned or self._lost_reason is not None:
                return
            self._lost_reason = reason
        self._job.cancel()
        log.warning(
            "election %r: leadership (term %d) lost: %s", self.election.name, self.term, reason
        )
        if self._on_lost is not None:
            try:
                self._on_lost(self)
            except Exception:
                log.exception("on_lost callback of election %r failed", self.election.name)

    def __enter__(self) -> Leadership:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._mutex:
            lost = self._lost_reason
            if lost is None and not self._resigned and time.monotonic() >= self._expires_at:
                # The renewal job may not have run yet: the clock alone says it is over.
                lost = TTL_PASSED
        try:
            self.resign()
        except BackendUnavailable as resign_error:
            if exc is not None:
                log.warning(
                    "election %r: resign after a failed block: %s", self.election.name, resign_error
                )
                return
            raise
        if lost is not None and exc is None:
            raise lost_in_block_error(self.election.name, self.term, lost)

    def __repr__(self) -> str:
        state = "held" if self.held else "not held"
        return f"<dcoord.Leadership {self.election.name!r} term={self.term} {state}>"


class Watch:
    """A thread that calls a callback with every change of leader; :meth:`stop` ends it."""

    def __init__(self, election: Election, callback: Callable[[Leader | None], object]) -> None:
        self._election = election
        self._callback = callback
        self._stopped = threading.Event()
        # Subscribe before the first read, so no change between the two is missed.
        self._subscription = election.store.subscribe(election.name)
        self._thread = threading.Thread(
            target=self._run, name=f"dcoord election watch {election.name!r}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        last: Leader | bool | None = False  # False: nothing delivered yet
        try:
            while not self._stopped.is_set():
                try:
                    record = self._election.store.leader(self._election.name)
                except DcoordError as exc:
                    log.info("election %r watch: read failed: %s", self._election.name, exc)
                    self._stopped.wait(WATCH_RETRY)
                    continue
                leader = leader_of(record)
                if leader != last:
                    last = leader
                    try:
                        self._callback(leader)
                    except Exception:
                        log.exception("watch callback of election %r failed", self._election.name)
                try:
                    self._subscription.wait(watch_wait(record))
                except BackendUnavailable as exc:
                    log.info("election %r watch: %s", self._election.name, exc)
                    self._stopped.wait(WATCH_RETRY)
        finally:
            self._subscription.close()

    def stop(self) -> None:
        """Stop watching; the callback is not called after this returns (unless it is
        running in the watch thread at the moment, which is then waited for)."""
        self._stopped.set()
        self._election._registry.discard(self)
        self._subscription.wake()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Election:
    """The leader election ``name``: campaign to lead it, read or watch its leader.

    Made by :meth:`dcoord.Client.election`. Any number of campaigns may run through one
    handle; each one that wins is a :class:`Leadership`.
    """

    def __init__(self, client: Client, name: str) -> None:
        self.name = validate_name("election name", name)
        self.client = client
        self.store = client.backend.elections
        self._registry = _client_elections(client)

    def campaign(
        self,
        value: str | bytes = b"",
        ttl: float = DEFAULT_TTL,
        timeout: float | None = None,
        on_lost: OnLeadershipLost | None = None,
    ) -> Leadership | None:
        """Block until this caller leads the election; None if ``timeout`` seconds passed.

        ``value`` (str or bytes, at most 64 KiB) is published with the leadership.
        ``ttl``: seconds a leader that stops renewing (crash, pause) keeps the election
        (on etcd rounded up to whole seconds, at least ~2 s). ``timeout``: None waits for
        ever, 0 makes one attempt. Waiting is notified (the leader's resignation or
        expiry), not polled. ``on_lost(leadership)`` is called if leadership is lost.
        """
        data = value_bytes(value)
        seconds = validate_ttl(ttl)
        wait = None if timeout is None else validate_timeout("timeout", timeout)
        if on_lost is not None and not callable(on_lost):
            raise ConfigError(f"on_lost must be callable or None, got {on_lost!r}")
        self.client.check_open()
        deadline = None if wait is None else time.monotonic() + wait
        slot = self.store.candidate(self.name, seconds, data)
        grant = slot.acquire(deadline)
        if grant is None:
            return None
        leadership = Leadership(self, slot, grant, data, seconds, on_lost)
        self._registry.add(leadership)
        return leadership

    def leader(self) -> Leader | None:
        """The current leader, or None if nobody leads."""
        self.client.check_open()
        return leader_of(self.store.leader(self.name))

    def watch(self, callback: Callable[[Leader | None], object]) -> Watch:
        """Call ``callback(leader)`` from a thread of its own now and on every change of
        leader (a new term, a proclaimed value, or None when nobody leads).

        Changes are notified by the server (Redis pub/sub, etcd watch), with the leader's
        expiry as the deadline for a silent one. Each call gets the latest state: changes
        faster than a read may be merged, but a later call never shows an earlier term.
        """
        if not callable(callback):
            raise ConfigError(f"watch callback must be callable, got {callback!r}")
        self.client.check_open()
        watch = Watch(self, callback)
        self._registry.add(watch)
        return watch

    def __repr__(self) -> str:
        return f"<dcoord.Election {self.name!r}>"


class _ClientElections:
    """The leaderships and watches of one client, resigned and stopped when it closes.

    One close hook per client (not per election handle), so a client that makes many
    short-lived handles does not pile up hooks; entries leave on resign and stop.
    """

    def __init__(self, client: Client) -> None:
        self._mutex = threading.Lock()
        self._items: set[Leadership | Watch] = set()
        client.on_close(self.close)

    def add(self, item: Leadership | Watch) -> None:
        with self._mutex:
            self._items.add(item)

    def discard(self, item: Leadership | Watch) -> None:
        with self._mutex:
            self._items.discard(item)

    def close(self) -> None:
        """Stop every watch, resign every leadership (best effort: the TTL covers the
        rest); the store's background work is the backend's to stop, after this."""
        with self._mutex:
            items, self._items = list(self._items), set()
        for item in items:
            if isinstance(item, Watch):
                item.stop()
        for item in items:
            if isinstance(item, Leadership):
                try:
                    item.resign()
                except DcoordError as exc:
                    log.info("election %r: not resigned at close: %s", item.election.name, exc)


_client_elections: PerKey[Client, _ClientElections] = PerKey(_ClientElections)
