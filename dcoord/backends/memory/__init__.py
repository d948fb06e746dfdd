"""The embedded backend: every client of ``memory://NAME`` in one process shares one store.

It has the same semantics as the server backends, with threads in place of processes:
one :class:`MemoryServer` per name plays the server (its condition variable is the
linearization point), and TTLs run on the monotonic clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..._version import __version__
from ...config import Settings
from ...convoyfree import convoy_free_condition
from ...scheduler import Scheduler
from ..base import ServerInfo
from .election import MemoryElections
from .kv import MemoryKV
from .locks import MemoryLocks
from .membership import MemoryGroups
from .rwlock import MemoryRWLocks
from .semaphore import MemorySemaphores
from .txlog import MemoryTxLog


class MemoryServer:
    """The shared state behind ``memory://NAME``: a dict of keys guarded by one condition."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cond = convoy_free_condition()
        self.data: dict[str, bytes] = {}
        # Key -> callables run (under cond) when it changes: async waiters, which cannot
        # wait on the condition, get their event set on their own loop this way.
        self.wakers: dict[str, set[Callable[[], object]]] = {}


_servers: dict[str, MemoryServer] = {}
_servers_lock = threading.Lock()


def memory_server(name: str) -> MemoryServer:
    """The process-wide store for ``memory://name``, created on first use."""
    with _servers_lock:
        server = _servers.get(name)
        if server is None:
            server = _servers[name] = MemoryServer(name)
        return server


class MemoryBackend:
    kind = "memory"

    def __init__(self, settings: Settings, scheduler: Scheduler) -> None:
        self.server = memory_server(settings.database)
        self.prefix = f"{settings.namespace}/"
        self.kv = MemoryKV(self.server, self.prefix)
        self.semaphores = MemorySemaphores(self.server, self.prefix)
        self.rwlocks = MemoryRWLocks(self.server, self.prefix)
        self.groups = MemoryGroups(self.server, self.prefix)
        self.locks = MemoryLocks(self.server, self.prefix, settings.options["label"])
        self.txlog = MemoryTxLog(self.server, self.prefix)
        self.elections = MemoryElections(self.server, self.prefix)

    def ping(self) -> ServerInfo:
        return ServerInfo(
            kind=self.kind, version=__version__, endpoint=f"memory://{self.server.name}"
        )

    def close_stores(self) -> None:
        """Nothing runs in the background: waiters wait on the store's condition."""

    def close(self) -> None:
        """Nothing to release: the store outlives its clients, like a server would."""
