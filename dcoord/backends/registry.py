"""The registry of backend drivers: which URL schemes each serves, and how to make it.

A driver is one package under :mod:`dcoord.backends` (or anywhere importable) plus one
:func:`register` call declaring its :class:`Driver`: its schemes (with TLS and topology),
its default port, the hooks that read and write the path of its URLs, its factory (a
dotted name, imported only when a client connects, so ``import dcoord`` never imports
redis or grpc), the extra that installs its dependencies, and its :class:`Capabilities`.
:mod:`dcoord.config` parses URLs, :func:`dcoord.backends.open_backend` connects and the
test fixtures pick their backends from here, instead of if-chains on the backend kind.

This module imports nothing of a driver and nothing of :mod:`dcoord.config` (which
imports it): a declaration is data and small functions.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import Settings

__all__ = [
    "PRIMITIVES",
    "Capabilities",
    "Driver",
    "Location",
    "Scheme",
    "SchemeTable",
    "UrlParts",
    "driver",
    "drivers",
    "lookup",
    "quoted",
    "register",
    "scheme_name",
    "unregister",
]

#: The stores a backend may provide, by their attribute on the backend (see base.Backend).
PRIMITIVES = frozenset({"kv", "locks", "semaphores", "rwlocks", "groups", "txlog", "elections"})
# How much of a value an error message quotes (a host may be a megabyte long).
_SHOWN = 120


def quoted(text: str) -> str:
    """``repr(text)``, of its start only when it is long (for error messages)."""
    if len(text) <= _SHOWN:
        return repr(text)
    return f"{text[:_SHOWN]!r}... ({len(text)} characters)"


@dataclass(frozen=True)
class Scheme:
    """One URL scheme of a driver."""

    name: str
    """Lower case, as in ``redis+sentinel``."""
    tls: bool = False
    topology: str = "single"
    """How the servers are arranged: ``single``, ``sentinel``, ``cluster``..."""
    multi_host: bool = False
    """Whether the URL may name several hosts (``h1:p1,h2:p2``)."""
    default_port: int | None = None
    """The port of a host given without one; None: the driver's."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, for the code that must choose (and for error messages)."""

    persistent: bool
    """State lives in a server and outlives the client's process (False: embedded)."""
    min_ttl: float = 0.0
    """The shortest lease the server keeps as asked; shorter TTLs are rounded up to it."""
    primitives: frozenset[str] = PRIMITIVES
    """Which stores of :data:`PRIMITIVES` the backend provides."""


@dataclass(frozen=True)
class UrlParts:
    """A URL cut up by :mod:`dcoord.config`, for a driver's :attr:`Driver.parse_path`."""

    scheme: Scheme
    path: str
    """What follows the hosts (for an embedded driver: all before the query)."""
    hosts: tuple[tuple[str, int], ...]
    shown: str
    """The URL, quoted and without its password, for error messages."""


@dataclass(frozen=True)
class Location:
    """What a driver reads from a URL's path."""

    database: str = "0"
    service: str | None = None


def _no_path(url: UrlParts) -> Location:
    if url.path.strip("/"):
        raise ConfigError(
            f"{url.scheme.name}:// URLs take no path, got {quoted('/' + url.path)} in {url.shown}"
        )
    return Location()


def _empty_path(settings: Settings) -> str:
    return ""


@dataclass(frozen=True)
class Driver:
    """The declaration of one backend kind. See :func:`register`."""

    kind: str
    """The backend's name (``Settings.kind``, ``ServerInfo.kind``)."""
    schemes: tuple[Scheme, ...]
    factory: str
    """``"module:attribute"`` of ``(settings, scheduler) -> Backend``, imported on connect."""
    capabilities: Capabilities
    default_port: int | None = None
    """None: embedded, the URL names no hosts and no user (``memory://NAME``)."""
    parse_path: Callable[[UrlParts], Location] = _no_path
    """Read the URL's path; raise ConfigError naming a bad one."""
    format_path: Callable[[Settings], str] = _empty_path
    """The inverse of :attr:`parse_path`, for :attr:`Settings.url` (leading ``/`` included)."""
    extra: str | None = None
    """The ``pip install 'dcoord[EXTRA]'`` that provides the factory's dependencies."""
    extra_modules: frozenset[str] = frozenset()
    """Top-level modules of the extra: a missing one means the extra is not installed."""
    async_factory: str | None = None
    """As :attr:`factory`, for the asyncio API's backend (None: not available yet)."""

    @property
    def embedded(self) -> bool:
        """Whether the backend runs inside the process (its URLs name no host)."""
        return self.default_port is None

    def load(self, *, asynchronous: bool = False) -> Callable[..., Any]:
        """Import and return the factory (raises ConfigError naming the extra to install
        when one of its modules is missing)."""
        target = self.async_factory if asynchronous else self.factory
        if target is None:
            raise ConfigError(f"{self.kind}:// has no asyncio backend yet")
        module, _, attribute = target.partition(":")
        try:
            factory: Callable[..., Any] = getattr(importlib.import_module(module), attribute)
        except ModuleNotFoundError as exc:
            if self.extra is None or (exc.name or "").split(".")[0] not in self.extra_modules:
                raise
            raise ConfigError(
                f"{self.kind}:// needs the {exc.name!r} package: pip install 'dcoord[{self.extra}]'"
            ) from exc
        return factory


_mutex = threading.Lock()
# Replaced, never mutated, under _mutex: readers take a reference without locking.
_drivers: dict[str, Driver] = {}
_schemes: dict[str, tuple[Driver, Scheme]] = {}
_SCHEME_NAME = re.compile(r"[a-z][a-z0-9+.-]*")


def register(new: Driver) -> Driver:
    """Make ``new`` the driver of its kind and schemes; returns it.

    Raises ConfigError if the kind or one of its schemes is taken by another driver, or
    if the declaration is malformed (no scheme, a scheme name not in lower case, a
    primitive that does not exist), so a clash fails at import, not at connect.
    """
    global _drivers, _schemes
    unknown = sorted(new.capabilities.primitives - PRIMITIVES)
    if unknown:
        raise ConfigError(f"driver {new.kind!r}: unknown primitives {unknown}")
    if not new.schemes:
        raise ConfigError(f"driver {new.kind!r} declares no URL scheme")
    for scheme in new.schemes:
        if not _SCHEME_NAME.fullmatch(scheme.name):
            raise ConfigError(f"driver {new.kind!r}: bad scheme name {scheme.name!r}")
    with _mutex:
        if new.kind in _drivers:
            raise ConfigError(f"a driver of kind {new.kind!r} is registered already")
        taken = [s.name for s in new.schemes if s.name in _schemes]
        if taken:
            raise ConfigError(
                f"driver {new.kind!r}: scheme {taken[0]}:// belongs to "
                f"{_schemes[taken[0]][0].kind!r}"
            )
        _drivers = {**_drivers, new.kind: new}
        _schemes = {**_schemes, **{s.name: (new, s) for s in new.schemes}}
    return new


def unregister(kind: str) -> None:
    """Forget the driver of ``kind`` and its schemes (for tests that register a toy)."""
    global _drivers, _schemes
    with _mutex:
        _drivers = {k: d for k, d in _drivers.items() if k != kind}
        _schemes = {n: (d, s) for n, (d, s) in _schemes.items() if d.kind != kind}


def drivers() -> tuple[Driver, ...]:
    """Every registered driver, in registration order."""
    return tuple(_drivers.values())


def driver(kind: str) -> Driver:
    """The driver of ``kind`` (raises ConfigError naming the known kinds)."""
    found = _drivers.get(kind)
    if found is None:
        raise ConfigError(f"no backend driver {kind!r}; known: {', '.join(_drivers)}")
    return found


def lookup(name: str, shown: str) -> tuple[Driver, Scheme]:
    """The driver and scheme of the URL scheme ``name`` (lower case) of the URL ``shown``;
    an unknown one is a ConfigError that lists every registered scheme."""
    found = _schemes.get(name)
    if found is None:
        known = ", ".join(f"{s}://" for s in _schemes)
        raise ConfigError(f"unknown URL scheme {quoted(name + '://')} in {shown}; known: {known}")
    return found


def scheme_name(kind: str, tls: bool, topology: str) -> str:
    """The scheme of a driver with this TLS and topology (for printing Settings)."""
    for scheme in driver(kind).schemes:
        if (scheme.tls, scheme.topology) == (tls, topology):
            return scheme.name
    raise ConfigError(f"{kind} has no scheme with tls={tls} and topology {topology!r}")


class SchemeTable(Mapping[str, tuple[str, bool, str]]):
    """A live, read-only view: scheme -> (kind, TLS, topology) of every registered one."""

    def __getitem__(self, name: str) -> tuple[str, bool, str]:
        found, scheme = _schemes[name]
        return found.kind, scheme.tls, scheme.topology

    def __iter__(self) -> Iterator[str]:
        return iter(_schemes)

    def __len__(self) -> int:
        return len(_schemes)


# --- the built-in drivers ------------------------------------------------------------

_REDIS_DATABASE = re.compile(r"[0-9]{1,2}")
# A Sentinel service (master) name: what `sentinel monitor` accepts, kept printable.
_SENTINEL_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _memory_path(url: UrlParts) -> Location:
    return Location(database=url.path.strip("/") or "default")


def _memory_format(settings: Settings) -> str:
    return "" if settings.database == "default" else settings.database


def _redis_path(url: UrlParts) -> Location:
    path, service = url.path, None
    if url.scheme.topology == "sentinel":
        service, _, path = path.strip("/").partition("/")
        if not _SENTINEL_SERVICE.fullmatch(service):
            raise ConfigError(
                f"a {url.scheme.name}:// URL names its service after the sentinels "
                f"({url.scheme.name}://host:port,.../SERVICE[/db]), got {quoted(service)} "
                f"in {url.shown}"
            )
    if url.scheme.topology == "cluster":
        # A Cluster has one database, 0: accept only that, so a /db meant for a single
        # server is not silently ignored.
        if path.strip("/") not in ("", "0"):
            raise ConfigError(
                f"a Redis Cluster has database 0 only, got {quoted('/' + path)} in {url.shown}"
            )
        return Location()
    database = path.strip("/") or "0"
    if not _REDIS_DATABASE.fullmatch(database) or int(database) > 15:
        raise ConfigError(
            f"redis database must be a number 0-15, got {quoted(database)} in {url.shown}"
        )
    return Location(database=database, service=service)


def _redis_format(settings: Settings) -> str:
    if settings.topology == "sentinel":
        return f"/{settings.service}/{settings.database}"
    if settings.topology == "single":
        return f"/{settings.database}"
    return ""


MEMORY = register(
    Driver(
        kind="memory",
        schemes=(Scheme("memory"),),
        factory="dcoord.backends.memory:MemoryBackend",
        async_factory="dcoord.backends.memory.aio_locks:AsyncMemoryBackend",
        capabilities=Capabilities(persistent=False),
        parse_path=_memory_path,
        format_path=_memory_format,
    )
)
REDIS = register(
    Driver(
        kind="redis",
        schemes=(
            Scheme("redis"),
            Scheme("rediss", tls=True),
            Scheme("redis+sentinel", topology="sentinel", multi_host=True, default_port=26379),
            Scheme(
                "rediss+sentinel",
                tls=True,
                topology="sentinel",
                multi_host=True,
                default_port=26379,
            ),
            Scheme("redis+cluster", topology="cluster", multi_host=True),
            Scheme("rediss+cluster", tls=True, topology="cluster", multi_host=True),
        ),
        factory="dcoord.backends.redis:RedisBackend",
        async_factory="dcoord.backends.redis.aio_locks:AsyncRedisBackend",
        capabilities=Capabilities(persistent=True),
        default_port=6379,
        parse_path=_redis_path,
        format_path=_redis_format,
        extra="redis",
        extra_modules=frozenset({"redis"}),
    )
)
ETCD = register(
    Driver(
        kind="etcd",
        schemes=(Scheme("etcd", multi_host=True), Scheme("etcds", tls=True, multi_host=True)),
        factory="dcoord.backends.etcd:EtcdBackend",
        async_factory="dcoord.backends.etcd.aio_locks:AsyncEtcdBackend",
        # etcd rounds a lease up to whole seconds, and to a minimum of about 2 s.
        capabilities=Capabilities(persistent=True, min_ttl=2.0),
        default_port=2379,
        extra="etcd",
        extra_modules=frozenset({"pyetcd", "grpc", "google"}),
    )
)
