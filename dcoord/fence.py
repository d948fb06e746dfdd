"""Fencing guards: let a resource reject the writes of a stale lock holder.

A lock cannot by itself stop a holder that was paused past its TTL from writing after
someone else took over (Jepsen; etcd's own docs). The fence closes that gap: every write
carries the lock's fencing token, and the resource admits a token only if it is at least
the highest one it has admitted. The stale holder's token is smaller than its
successor's, so once the successor has written, the stale write is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError
from .lock import validate_name

if TYPE_CHECKING:
    from .client import Client

MAX_TOKEN = 2**63 - 1


class Fence:
    """The fencing guard of one resource, kept in the client's backend.

    Made by :meth:`dcoord.Client.fence`. :meth:`admit` is atomic on the server (a Lua
    script on Redis, a transaction on etcd), so concurrent writers of any client agree.
    """

    def __init__(self, client: Client, resource: str) -> None:
        self.resource = validate_name("fence resource", resource)
        self._client = client
        self._store = client.backend.locks

    def admit(self, token: int) -> bool:
        """Record ``token`` and return True if it is >= every token admitted before.

        Returns False, recording nothing, if a greater token was admitted: the caller
        holds a stale lock and must not write. Admitting the same token again is allowed
        (one holder writing several times).
        """
        self._client.check_open()
        return self._store.admit(self.resource, validate_token(token))

    def write(self, token: int, key: str, value: bytes) -> bool:
        """Admit ``token`` as :meth:`admit` does and, only if admitted, write ``value`` at
        the plain key ``key`` of this client's namespace (``client.backend.kv``), in one
        atomic step on the server. True if written; False, writing nothing, if a greater
        token was admitted.

        Use it for state kept in the same backend: a holder paused between a separate
        ``admit()`` and its write could otherwise still write after a newer holder took
        over. For a read-modify-write, ``admit()`` before reading too, so that no stale
        write can land between your read and your write. The write is not retried after
        a lost reply (BackendUnavailable: it may or may not have happened).
        """
        token, data = validate_write(token, key, value)
        self._client.check_open()
        return self._store.write(self.resource, token, key, data)

    def highest(self) -> int | None:
        """The greatest token admitted so far, or None if none was."""
        self._client.check_open()
        return self._store.highest(self.resource)

    def __repr__(self) -> str:
        return f"<dcoord.Fence {self.resource!r}>"


def validate_write(token: object, key: object, value: object) -> tuple[int, bytes]:
    """The checked arguments of a fenced write (shared with :class:`dcoord.aio.AsyncFence`)."""
    checked = validate_token(token)
    validate_name("key", key)
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ConfigError(f"value must be bytes, got {type(value).__name__}")
    return checked, bytes(value)


def validate_token(token: object) -> int:
    """A fencing token: an int in [0, 2**63)."""
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= MAX_TOKEN:
        raise ConfigError(f"fencing token must be an int in [0, 2**63), got {token!r}")
    return token
