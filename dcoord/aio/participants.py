"""Async 2PC participants: the :class:`AsyncParticipant` protocol and
:class:`AsyncKVParticipant`, a key-value store in the backend.

:class:`AsyncKVParticipant` is :class:`dcoord.KVParticipant` with awaits: the same
programs (:class:`dcoord.participants.KVCore`: stage with one conditional write,
reserve keys until the outcome, wait-die between conflicting prepares) on the same keys,
answered by the async backend's plain-key store. So a sync and an async participant of
one name are one participant: either may commit or abort what the other prepared.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from ..errors import ConfigError
from ..participants import (
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_LOCK_TTL,
    Get,
    KVCore,
    Request,
    Swap,
    Validator,
    _check_key,
)

if TYPE_CHECKING:
    from .client import AsyncClient

T = TypeVar("T")
R = TypeVar("R")


@runtime_checkable
class AsyncParticipant(Protocol):
    """A resource manager taking part in two-phase commit, with coroutine methods.

    The contract of :class:`dcoord.Participant`: ``prepare`` makes its prepared state
    durable before voting yes; ``commit`` and ``abort`` are idempotent, and ``abort``
    accepts a txid it never prepared. Optional: ``validate(payload)`` (a plain function,
    called by :meth:`AsyncTransaction.enlist`) and ``async in_doubt()`` (prepared
    transactions, for :meth:`AsyncCoordinator.recover`).
    """

    name: str

    async def prepare(self, txid: str, payload: Any) -> bool: ...

    async def commit(self, txid: str) -> None: ...

    async def abort(self, txid: str) -> None: ...


def check_async(participant: object) -> None:
    """ConfigError if ``participant``'s protocol methods are not coroutine functions
    (a sync participant would block the event loop)."""
    for method in ("prepare", "commit", "abort"):
        if not inspect.iscoroutinefunction(getattr(participant, method, None)):
            raise ConfigError(
                f"{participant!r} is not an AsyncParticipant: its {method} is not a "
                "coroutine function (a sync participant belongs to dcoord.Coordinator)"
            )


async def drive(steps: Generator[R, Any, T], answer: Callable[[R], Awaitable[Any]]) -> T:
    """:func:`dcoord.core.twopc_state.run` with awaits: ``await answer(request)`` for
    each request the program yields, its error thrown back in. A cancellation is not an
    answer: it propagates, and the program is dropped where it stood."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            request = steps.send(reply) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        try:
            reply, error = await answer(request), None
        except Exception as exc:  # the program re-raises what it does not handle
            reply, error = None, exc


class AsyncKVParticipant(KVCore):
    """:class:`dcoord.KVParticipant` for an :class:`~dcoord.aio.AsyncClient`: the same
    payloads, checks, keys and behaviour, with coroutine methods."""

    def __init__(
        self,
        client: AsyncClient,
        name: str,
        *,
        validate: Validator | None = None,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        super().__init__(
            client, name, validate=validate, lock_ttl=lock_ttl, lock_timeout=lock_timeout
        )
        self._kv = client.backend.kv_store

    async def get(self, key: str, default: Any = None) -> Any:
        """The committed value of ``key`` (``default`` if it has none)."""
        return self._value(await self._kv.get(self._data(_check_key(key))), default)

    async def items(self) -> dict[str, Any]:
        """Every committed key and value."""
        return self._items(await self._kv.scan(self._root + "d/"))

    async def in_doubt(self) -> list[str]:
        """Transactions prepared here and not yet committed or aborted (like XA recover)."""
        return self._txids(await self._kv.scan(self._root + "s/"))

    async def reserved(self) -> dict[str, str]:
        """Key -> the txid of the prepared transaction that reserves it."""
        return self._owners(await self._kv.scan(self._root + "o/"))

    async def prepare(self, txid: str, payload: Any) -> bool:
        """As :meth:`dcoord.KVParticipant.prepare`; a cancelled prepare may have staged
        (its write in flight): the coordinator's abort, or recovery, releases it."""
        return await drive(self._prepare_steps(txid, payload), self._answer)

    async def commit(self, txid: str) -> None:
        """Apply the staged writes atomically and release the keys; idempotent."""
        await drive(self._commit_steps(txid), self._answer)

    async def abort(self, txid: str) -> None:
        """Drop the staged writes and release the keys; idempotent, fine if never prepared."""
        await drive(self._abort_steps(txid), self._answer)

    async def _answer(self, request: Request) -> Any:
        if isinstance(request, Get):
            return await self._kv.get(request.key)
        if isinstance(request, Swap):
            return await self._kv.swap(request.puts, request.deletes, request.only_if)
        await asyncio.sleep(request.seconds)
        return None

    def __repr__(self) -> str:
        return f"<dcoord.aio.AsyncKVParticipant {self.name!r} on {self.client.url}>"
