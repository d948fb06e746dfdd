"""Group membership in the embedded store: one JSON record per group, the monotonic clock.

The record is ``{"epoch": n, "members": {id: {"expires": t, "token": s, "payload": s}}}``
under ``<namespace>/groups/<name>``. Every operation runs under the server's condition
and notifies it on change, which is what subscribers wait on; each change is also
appended to the group's change log (the last :data:`LOG_LENGTH`, kept beside the server's
data rather than in the record that every operation parses whole), from which
subscribers hand followers the changes themselves.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..base import GroupChange, GroupSnapshot, TokenRegistration

if TYPE_CHECKING:
    from . import MemoryServer

#: Changes kept per group: a subscriber further behind than this re-reads the group.
LOG_LENGTH = 1024

# Server -> group key -> its last changes, oldest first (guarded by the server's cond).
_logs: weakref.WeakKeyDictionary[MemoryServer, dict[str, deque[GroupChange]]] = (
    weakref.WeakKeyDictionary()
)


class MemoryGroups:
    def __init__(self, server: MemoryServer, prefix: str) -> None:
        self._server = server
        self._prefix = f"{prefix}groups/"
        with server.cond:
            self._logs = _logs.setdefault(server, {})

    # Callers hold self._server.cond for everything below that touches the record.

    def _load(self, group: str) -> dict[str, Any]:
        raw = self._server.data.get(self._prefix + group)
        record: dict[str, Any] = json.loads(raw) if raw is not None else {"epoch": 0, "members": {}}
        return record

    def _store(
        self,
        group: str,
        record: dict[str, Any],
        joined: Mapping[str, bytes] | None = None,
        left: tuple[str, ...] = (),
        ttl: float | None = None,
    ) -> None:
        record["epoch"] += 1
        key = self._prefix + group
        self._server.data[key] = json.dumps(record).encode()
        log = self._logs.get(key)
        epoch = record["epoch"]
        if log is None or (log and log[-1].epoch >= epoch):  # (the record was replaced)
            log = self._logs[key] = deque(maxlen=LOG_LENGTH)
        log.append(GroupChange(epoch, epoch - 1, joined or {}, left, ttl))
        self._server.cond.notify_all()
        for waker in self._server.wakers.get(key, ()):
            waker()

    def _pruned(self, group: str) -> dict[str, Any]:
        record = self._load(group)
        now = time.monotonic()
        members = record["members"]
        expired = [m for m, entry in members.items() if entry["expires"] <= now]
        for member_id in expired:
            del members[member_id]
        if expired:
            self._store(group, record, left=tuple(expired))
        return record

    def epoch(self, group: str) -> int:
        with self._server.cond:
            return int(self._load(group)["epoch"])

    def changes(self, group: str, seen: int) -> tuple[int, list[GroupChange] | None]:
        """The group's last epoch and its changes after epoch ``seen`` (None: ``seen`` is
        not one the log knows, or is older than it: re-read). Caller holds the cond."""
        log = self._logs.get(self._prefix + group)
        if not log or log[-1].epoch == seen:
            return seen, []
        if not log[0].after <= seen <= log[-1].epoch:
            return log[-1].epoch, None
        # Newest first: a follower that keeps up wants the last one or two.
        newer: list[GroupChange] = []
        for change in reversed(log):
            if change.epoch <= seen:
                break
            newer.append(change)
        newer.reverse()
        return log[-1].epoch, newer

    def join(
        self, group: str, member_id: str, payload: bytes, ttl: float
    ) -> TokenRegistration | None:
        token = secrets.token_hex(16)
        with self._server.cond:
            record = self._pruned(group)
            if member_id in record["members"]:
                return None
            expires = time.monotonic() + ttl
            record["members"][member_id] = {
                "expires": expires,
                "token": token,
                "payload": payload.decode(),
            }
            self._store(group, record, joined={member_id: payload}, ttl=ttl)
        return TokenRegistration(self, group, member_id, token, ttl, expires)

    def read(self, group: str) -> GroupSnapshot:
        with self._server.cond:
            record = self._pruned(group)
        members = record["members"]
        soonest = min((e["expires"] for e in members.values()), default=None)
        return GroupSnapshot(
            epoch=record["epoch"],
            members={m: e["payload"].encode() for m, e in members.items()},
            next_expiry=None if soonest is None else max(0.0, soonest - time.monotonic()),
        )

    def refresh(self, group: str, member_id: str, token: str, ttl: float) -> bool:
        with self._server.cond:
            record = self._pruned(group)
            entry = record["members"].get(member_id)
            if entry is None or entry["token"] != token:
                return False
            # A heartbeat is not a membership change: no epoch bump, no notification.
            entry["expires"] = time.monotonic() + ttl
            self._server.data[self._prefix + group] = json.dumps(record).encode()
            return True

    def leave(self, group: str, member_id: str, token: str) -> bool:
        with self._server.cond:
            record = self._pruned(group)
            entry = record["members"].get(member_id)
            if entry is None or entry["token"] != token:
                return False
            del record["members"][member_id]
            self._store(group, record, left=(member_id,))
            return True

    def subscribe(self, group: str) -> MemorySubscription:
        return MemorySubscription(self, group)

    def add_waker(self, group: str, waker: Callable[[], object]) -> None:
        """Call ``waker`` (under the condition: it must not block) on every change of
        ``group``; for async subscribers, which cannot wait on the condition."""
        with self._server.cond:
            self._server.wakers.setdefault(self._prefix + group, set()).add(waker)

    def remove_waker(self, group: str, waker: Callable[[], object]) -> None:
        with self._server.cond:
            wakers = self._server.wakers.get(self._prefix + group, set())
            wakers.discard(waker)
            if not wakers:
                self._server.wakers.pop(self._prefix + group, None)

    @property
    def cond(self) -> threading.Condition:
        return self._server.cond


class MemorySubscription:
    def __init__(self, groups: MemoryGroups, group: str) -> None:
        self._groups = groups
        self._group = group
        self._seen = groups.epoch(group)
        self._woken = False

    def wait(self, timeout: float) -> list[GroupChange] | None:
        groups, group = self._groups, self._group
        with groups.cond:
            # The log, not the record: the condition wakes on every lock and key change
            # of the whole store, and parsing the record each time cost milliseconds.
            groups.cond.wait_for(
                lambda: self._woken or groups.changes(group, self._seen)[0] != self._seen,
                timeout,
            )
            self._seen, changes = groups.changes(group, self._seen)
            self._woken = False
        return changes

    def wake(self) -> None:
        with self._groups.cond:
            self._woken = True
            self._groups.cond.notify_all()

    def close(self) -> None:
        """Nothing to release."""
