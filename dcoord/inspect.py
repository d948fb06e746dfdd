"""Who holds what: the held locks of a namespace, with their holders, for operators.

A grant carries its holder's identity (``host:pid`` and the client's optional ``label``
option) where the backend keeps the lock:

- Redis: the lock key's value, which compare-and-act compares, is
  ``<32 random hex>|<host>:<pid>|<label>`` - still unique per grant, so the lock scripts
  are unchanged, and :func:`info` is a GET and a PTTL. The acquired-at time is read from
  the fence, which the acquire script sets to the server's ``TIME`` in microseconds
  (or the previous fence + 1, which is within a microsecond of it).
- etcd: the queue key's value is the identity as JSON (with the client's wall time of
  the request); the holder is the key with the lowest create revision, the waiters are
  the other keys, the TTL left is the lease's.
- memory: the same fields, kept beside the lock's entry.

The backend parts live in ``dcoord/backends/<kind>/inspect.py`` as functions
``locks(backend, prefix)``, ``info(backend, name)`` and ``groups(backend)``;
:func:`locks`, :func:`lock` and :func:`groups` dispatch on the backend's kind. The async
parts (``dcoord/backends/<kind>/aio_inspect.py``, the same functions as coroutines, for
:mod:`dcoord.aio`) do only the I/O: what a reply means is the sync part's pure helpers.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backends.base import Backend

#: Separates the random part, the ``host:pid`` and the label in a Redis lock token.
SEPARATOR = "|"


@dataclass(frozen=True)
class LockInfo:
    """One held lock as the server sees it now."""

    name: str
    """The lock's name (as given to :meth:`dcoord.Client.lock`)."""
    holder: str | None
    """``host:pid`` of the holding process; None for a holder that is not a dcoord
    client of this version (an ``etcdctl lock``, or an older dcoord)."""
    label: str | None
    """The ``label`` option of the holder's client, if it set one."""
    fence: int
    """The fencing token of the current grant."""
    acquired_at: float | None
    """Unix time of the grant: the server's clock on Redis, this process's on memory;
    on etcd the holder's clock when it *queued* (the grant time when the lock was free,
    earlier when it waited). None when unknown."""
    ttl_left: float | None
    """Seconds until the server lets the lock go unless it is renewed (etcd: whole
    seconds, the lease's); None when the lock has no TTL."""
    waiters: int | None
    """Handles waiting for the lock (memory, etcd). On Redis there is no queue: the
    number of client connections subscribed to the lock's release channel, which counts
    a client once however many of its handles wait, and for up to 5 s after its last
    waiter stopped. None when unknown."""

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Identity:
    """Who a process is, as lock grants record it."""

    holder: str
    label: str | None


def identity(label: str | None) -> Identity:
    """This process's identity with the client's ``label``."""
    return Identity(f"{socket.gethostname()}:{os.getpid()}", label or None)


def holder_suffix(label: str | None) -> str:
    """What a Redis owner token carries after its random part: who holds the grant."""
    me = identity(label)
    return SEPARATOR + me.holder + SEPARATOR + (me.label or "")


def parse_token(token: str) -> Identity | None:
    """The identity in a Redis owner token; None for a bare random token."""
    parts = token.split(SEPARATOR, 2)
    if len(parts) != 3:
        return None
    return Identity(parts[1], parts[2] or None)


def identity_json(label: str | None, at: float) -> bytes:
    """The value of an etcd queue key: the identity, and the wall time ``at`` it queued."""
    me = identity(label)
    return json.dumps({"holder": me.holder, "label": me.label, "at": at}).encode()


def parse_identity_json(value: bytes) -> tuple[Identity | None, float | None]:
    """The identity and queue time in an etcd queue key's value ((None, None): not ours)."""
    try:
        doc = json.loads(value)
        holder, label, at = doc["holder"], doc.get("label"), doc.get("at")
    except (ValueError, TypeError, KeyError):
        return None, None
    if not isinstance(holder, str):
        return None, None
    return (
        Identity(holder, label if isinstance(label, str) else None),
        float(at) if isinstance(at, int | float) else None,
    )


def name_of_segment(segment: str) -> str:
    """The name a key segment encodes (the inverse of ``backends.base.key_segment``).

    ``key_segment`` encodes ``%`` too, so every ``%XX`` in a segment is one it wrote.
    """
    return urllib.parse.unquote(segment)


def locks(backend: Backend, prefix: str = "") -> list[LockInfo]:
    """Every lock held in the backend's namespace whose name starts with ``prefix``,
    sorted by name."""
    lister: Callable[[Any, str], list[LockInfo]] = backend_part(backend.kind).locks
    return by_name(lister(backend, prefix))


def lock(backend: Backend, name: str) -> LockInfo | None:
    """Lock ``name`` in the backend's namespace if it is held, else None."""
    reader: Callable[[Any, str], LockInfo | None] = backend_part(backend.kind).info
    return reader(backend, name)


def groups(backend: Backend) -> list[str]:
    """The names of the groups that have (or recently had) members in the namespace,
    sorted; read a group's live members with :meth:`dcoord.Client.group`."""
    lister: Callable[[Any], set[str]] = backend_part(backend.kind).groups
    return sorted(lister(backend))


def by_name(found: Iterable[LockInfo]) -> list[LockInfo]:
    """Locks in the order every listing returns them: by name."""
    return sorted(found, key=lambda info: info.name)


def backend_part(kind: str, *, asynchronous: bool = False) -> Any:
    """The inspection module of backend ``kind``: ``inspect``, or ``aio_inspect`` for the
    async API."""
    module = "aio_inspect" if asynchronous else "inspect"
    return importlib.import_module(f"dcoord.backends.{kind}.{module}")
