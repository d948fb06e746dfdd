"""Backends: one package per server kind, each exposing the primitives of :mod:`.base`.

Which package serves which URL scheme is declared once, in :mod:`.registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import registry
from .base import Backend, ServerInfo

if TYPE_CHECKING:
    from ..config import Settings
    from ..scheduler import Scheduler

__all__ = ["Backend", "ServerInfo", "open_backend"]


def open_backend(settings: Settings, scheduler: Scheduler) -> Backend:
    """Connect to the backend ``settings`` describe, through its registered driver
    (raises BackendUnavailable if unreachable, ConfigError if its extra is missing)."""
    backend: Backend = registry.driver(settings.kind).load()(settings, scheduler)
    return backend
