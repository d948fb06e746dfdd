"""Async fencing guards: :class:`dcoord.Fence` with coroutines."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..fence import validate_token, validate_write
from ..lock import validate_name

if TYPE_CHECKING:
    from .client import AsyncClient


class AsyncFence:
    """The fencing guard of one resource; made by :meth:`AsyncClient.fence`.

    Same semantics and server-side state as :class:`dcoord.Fence`: a sync and an async
    client guarding one resource see the same highest token.
    """

    def __init__(self, client: AsyncClient, resource: str) -> None:
        self.resource = validate_name("fence resource", resource)
        self._client = client
        self._store = client.backend.locks

    async def admit(self, token: int) -> bool:
        """Record ``token`` and return True if it is >= every token admitted before;
        False, recording nothing, if a greater one was (see :meth:`dcoord.Fence.admit`)."""
        checked = validate_token(token)
        self._client.check_open()
        return await self._store.admit(self.resource, checked)

    async def write(self, token: int, key: str, value: bytes) -> bool:
        """Admit ``token`` and, only if admitted, write ``value`` at the plain key ``key``
        in one atomic step; True if written (see :meth:`dcoord.Fence.write`). Not retried
        after a lost reply (BackendUnavailable: it may or may not have happened)."""
        checked, data = validate_write(token, key, value)
        self._client.check_open()
        return await self._store.write(self.resource, checked, key, data)

    async def highest(self) -> int | None:
        """The greatest token admitted so far, or None if none was."""
        self._client.check_open()
        return await self._store.highest(self.resource)

    def __repr__(self) -> str:
        return f"<dcoord.aio.AsyncFence {self.resource!r}>"
