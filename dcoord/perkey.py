"""One object per key, made on first use and gone with the key: the per-client and
per-server registries of locks and elections."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class PerKey(Generic[K, V]):
    """``per_key(key)``: the one value of ``key``, made by ``factory(key)`` the first time.

    Keys are held weakly, so a value lives as long as its key (a client, a memory
    server); two threads asking at once get the same value.
    """

    def __init__(self, factory: Callable[[K], V]) -> None:
        self._factory = factory
        self._values: weakref.WeakKeyDictionary[K, V] = weakref.WeakKeyDictionary()
        self._mutex = threading.Lock()

    def __call__(self, key: K) -> V:
        with self._mutex:
            value = self._values.get(key)
            if value is None:
                value = self._values[key] = self._factory(key)
            return value
