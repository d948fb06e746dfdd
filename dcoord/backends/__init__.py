"""Backends: one package per server kind, each exposing the primitives of :mod:`.base`."""

from __future__ import annotations

from ..config import Settings
from ..errors import ConfigError
from ..scheduler import Scheduler
from .base import Backend, ServerInfo

__all__ = ["Backend", "ServerInfo", "open_backend"]

# Top-level modules of each extra: a missing one means the extra is not installed.
_EXTRA_MODULES = {"redis": {"redis"}, "etcd": {"pyetcd", "grpc", "google"}}


def open_backend(settings: Settings, scheduler: Scheduler) -> Backend:
    """Connect to the backend ``settings`` describe (raises BackendUnavailable if unreachable)."""
    try:
        if settings.kind == "memory":
            from .memory import MemoryBackend

            return MemoryBackend(settings, scheduler)
        if settings.kind == "redis":
            from .redis import RedisBackend

            return RedisBackend(settings, scheduler)
        from .etcd import EtcdBackend

        return EtcdBackend(settings, scheduler)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _EXTRA_MODULES.get(settings.kind, set()):
            raise
        raise ConfigError(
            f"{settings.kind}:// needs the {exc.name!r} package: "
            f"pip install 'dcoord[{settings.kind}]'"
        ) from exc
