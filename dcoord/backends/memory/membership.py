"""Group membership in the embedded store: one JSON record per group, the monotonic clock.

The record is ``{"epoch": n, "members": {id: {"expires": t, "token": s, "payload": s}}}``
under ``<namespace>/groups/<name>``. Every operation runs under the server's condition
and notifies it on change, which is what subscribers wait on.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..base import GroupSnapshot, TokenRegistration

if TYPE_CHECKING:
    from . import MemoryServer


class MemoryGroups:
    def __init__(self, server: MemoryServer, prefix: str) -> None:
        self._server = server
        self._prefix = f"{prefix}groups/"

    # Callers hold self._server.cond for everything below that touches the record.

    def _load(self, group: str) -> dict[str, Any]:
        raw = self._server.data.get(self._prefix + group)
        record: dict[str, Any] = json.loads(raw) if raw is not None else {"epoch": 0, "members": {}}
        return record

    def _store(self, group: str, record: dict[str, Any]) -> None:
        record["epoch"] += 1
        key = self._prefix + group
        self._server.data[key] = json.dumps(record).encode()
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
            self._store(group, record)
        return record

    def epoch(self, group: str) -> int:
        with self._server.cond:
            return int(self._load(group)["epoch"])

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
            self._store(group, record)
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
            self._store(group, record)
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

    def wait(self, timeout: float) -> None:
        with self._groups.cond:
            self._groups.cond.wait_for(
                lambda: self._woken or self._groups.epoch(self._group) != self._seen, timeout
            )
            self._seen = self._groups.epoch(self._group)
            self._woken = False

    def wake(self) -> None:
        with self._groups.cond:
            self._woken = True
            self._groups.cond.notify_all()

    def close(self) -> None:
        """Nothing to release."""
