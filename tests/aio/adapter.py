"""The async API behind the sync API's shape, so the sync conformance tests run on it.

Test-only: one event loop runs on a thread of its own, and every call of a
:class:`SyncView` client, lock or fence runs the async API's coroutine on that loop and
waits for it. The library itself starts no thread; this adapter does, so that the
conformance tests (written with threads) drive dcoord.aio unchanged. ``backend`` is the
backend of a sync client of the same URL and namespace, for the tests' inspection
helpers (``stored_keys``, ``backend.kv``), which read what the server holds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

import dcoord
import dcoord.aio
from dcoord.errors import ConfigError
from tests.aio.membership_adapter import SyncGroup

T = TypeVar("T")


class Loop:
    """An event loop on a daemon thread; :meth:`run` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="test-aio-loop", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class SyncView:
    """An :class:`dcoord.aio.AsyncClient` with the sync Client's methods."""

    def __init__(self, loop: Loop, url: str, **options: Any) -> None:
        self._loop = loop

        async def connect() -> dcoord.aio.AsyncClient:
            return await dcoord.aio.connect(url, **options)

        self.aio = loop.run(connect())
        self._shadow = dcoord.connect(url, **options)

    @property
    def backend(self) -> Any:
        return self._shadow.backend

    @property
    def closed(self) -> bool:
        return self.aio.closed

    @property
    def namespace(self) -> str:
        return self.aio.namespace

    def lock(self, name: str, **options: Any) -> SyncLock:
        return SyncLock(self, name, options)

    def group(self, name: str) -> SyncGroup:
        return SyncGroup(self, name)

    def fence(self, resource: str) -> SyncFence:
        return SyncFence(self, self.aio.fence(resource))

    def ping(self) -> Any:
        return self._loop.run(self.aio.ping())

    def close(self) -> None:
        try:
            self._loop.run(self.aio.close())
        finally:
            self._shadow.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(coro)


class SyncLock:
    """An :class:`dcoord.aio.AsyncLock` with :class:`dcoord.Lock`'s methods."""

    def __init__(self, client: SyncView, name: str, options: dict[str, Any]) -> None:
        self._client = client
        on_lost: Callable[[SyncLock], object] | None = options.pop("on_lost", None)
        if on_lost is not None and callable(on_lost):
            user = on_lost
            options["on_lost"] = lambda _: user(self)
        elif on_lost is not None:
            options["on_lost"] = on_lost  # let the library refuse it
        self.aio = client.aio.lock(name, **options)

    @property
    def name(self) -> str:
        return self.aio.name

    @property
    def held(self) -> bool:
        return self.aio.held

    @property
    def fence(self) -> int:
        return self.aio.fence

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        if not blocking:
            if timeout is not None and timeout != -1:
                raise ConfigError("a non-blocking acquire takes no timeout")
            timeout = 0
        return self._client.run(self.aio.acquire(timeout))

    def release(self) -> None:
        self._client.run(self.aio.release())

    def extend(self, ttl: float | None = None) -> None:
        self._client.run(self.aio.extend(ttl))

    def __enter__(self) -> SyncLock:
        self._client.run(self.aio.__aenter__())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client.run(self.aio.__aexit__(exc_type, exc, tb))


class SyncFence:
    """An :class:`dcoord.aio.AsyncFence` with :class:`dcoord.Fence`'s methods."""

    def __init__(self, client: SyncView, fence: dcoord.aio.AsyncFence) -> None:
        self._client = client
        self.aio = fence

    def admit(self, token: int) -> bool:
        return self._client.run(self.aio.admit(token))

    def write(self, token: int, key: str, value: bytes) -> bool:
        return self._client.run(self.aio.write(token, key, value))

    def highest(self) -> int | None:
        return self._client.run(self.aio.highest())
