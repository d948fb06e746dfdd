"""The primitives every backend implements, and the retry helper they share.

Backends implement *primitives*; the semantics (validation, TTL defaults, watchdogs,
context managers, the ring, the 2PC state machine) live once in the core. A backend is
a small object that owns its connection and exposes one store per primitive:

==========  ===================================================================
``kv``      plain keys under the namespace (get / put / delete / scan)
==========  ===================================================================

Keys passed to a store are relative to the client's namespace; the backend maps them
into its own keyspace so two namespaces on one server never see each other's keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_before_delay,
    wait_random_exponential,
)

from ..errors import BackendUnavailable

T = TypeVar("T")


@dataclass(frozen=True)
class ServerInfo:
    """What :meth:`dcoord.Client.ping` returns."""

    kind: str
    """``"memory"``, ``"redis"`` or ``"etcd"``."""
    version: str
    """The server's version (for memory: the dcoord version)."""
    endpoint: str
    """Where the client is connected (host:port, or the memory store name)."""


class KVStore(Protocol):
    """Plain keys under the namespace. Values are bytes; keys are non-empty strings."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...

    def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""
        ...

    def scan(self, prefix: str) -> dict[str, bytes]:
        """Every key starting with ``prefix`` (relative to the namespace) and its value."""
        ...


class Backend(Protocol):
    """A connected backend. Created by :func:`dcoord.backends.open_backend`."""

    @property
    def kind(self) -> str: ...

    @property
    def kv(self) -> KVStore: ...

    def ping(self) -> ServerInfo: ...

    def close(self) -> None:
        """Release connections, leases and watches; idempotent."""
        ...


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    timeout: float,
    transient: tuple[type[BaseException], ...],
) -> T:
    """Call ``fn``, retrying ``transient`` errors with jittered backoff for up to ``timeout`` s.

    When the time is up, raise :class:`BackendUnavailable` naming ``what``, with the last
    error chained. Use it only for operations that are safe to repeat.
    """
    retrying = Retrying(
        retry=retry_if_exception_type(transient),
        stop=stop_before_delay(timeout),
        wait=wait_random_exponential(multiplier=0.05, max=1.0),
        reraise=False,
    )
    try:
        return retrying(fn)
    except RetryError as exc:
        cause = exc.last_attempt.exception()
        raise BackendUnavailable(
            f"{what}: {cause or 'no answer'} (gave up after {timeout:g} s)"
        ) from cause
