"""pyetcd's client, adapted to a cluster of several members.

pyetcd's own failover marks a member "failed" for ``time_retry`` seconds after one error
and then takes the first member (in URL order) not so marked: during a leader failover
it bounces back to a member that is paused, or that is still waiting for the election,
every ``time_retry``. And it runs every request with one fixed timeout, so a request
sent to a paused member takes the caller's whole time budget and no other member is
ever tried. This client:

- moves on, after a transient failure on one member, to the next member in URL order
  (:meth:`EtcdClient.move_on`), so that every member is tried in turn;
- takes the timeout of a request from ``narrowed()`` when that is set (the backend sets
  it per thread and attempt), so that one call can try several members within its budget
  (the creation of a watch too: pyetcd fixes its timeout when the stream is made);
- fails the watches of a stream it abandons (a member failed, or the client moved on):
  pyetcd only half-closes that stream, and its watches would stay silent forever if the
  member hangs; their callbacks get an error instead, and their owners watch again, on
  the member now in use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pyetcd
from pyetcd import etcdrpc, watch
from pyetcd import exceptions as etcd_errors

log = logging.getLogger("dcoord.etcd")


class EtcdClient(pyetcd.MultiEndpointEtcd3Client):  # type: ignore[misc]
    """A pyetcd client that picks its member itself; see the module's docstring."""

    def __init__(
        self,
        endpoints: list[pyetcd.Endpoint],
        *,
        narrowed: Callable[[], float | None],
        **options: Any,
    ) -> None:
        # Before pyetcd's __init__: it sets the timeout and sends a first request.
        self._narrowed = narrowed
        self._default_timeout: float | None = None
        self._moving = threading.Lock()
        # Never "failed" for pyetcd: which member to use is move_on's choice alone.
        for endpoint in endpoints:
            endpoint.time_retry = 0.0
        super().__init__(endpoints=endpoints, failover=False, **options)

    @property
    def timeout(self) -> float | None:
        """The timeout of a request: ``narrowed()`` (the calling thread's attempt), else
        the client's."""
        narrowed = self._narrowed()
        return self._default_timeout if narrowed is None else narrowed

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._default_timeout = value

    @property
    def member(self) -> str:
        """The member (host:port) requests go to now."""
        return str(self._current_endpoint_label)

    def move_on(self, failed: str) -> None:
        """After a transient failure on member ``failed``, use the next member in URL
        order; nothing if another thread has already moved on from it."""
        labels = list(self.endpoints)
        if len(labels) < 2:
            return
        with self._moving:
            if self.member != failed:
                return
            # pyetcd's setter drops the stubs (and the watch stream) of the old member.
            self._current_endpoint_label = labels[(labels.index(failed) + 1) % len(labels)]
        log.info("etcd member %s failed; now using %s", failed, self.member)

    def get_watcher(self) -> _Watcher:
        return _Watcher(
            self,
            etcdrpc.WatchStub(self.channel),
            call_credentials=self.call_credentials,
            metadata=self.metadata,
        )

    def _clear_old_stubs(self) -> None:
        watcher = self._stubs.get("watcher")
        super()._clear_old_stubs()
        if watcher is not None:
            _abandon(watcher)


class _Watcher(watch.Watcher):  # type: ignore[misc]
    """pyetcd's watcher, waiting for a new watch as long as the calling thread's request
    may take: pyetcd's waits the timeout of whichever call happened to start the stream."""

    def __init__(self, client: EtcdClient, stub: Any, **options: Any) -> None:
        self._client = client
        super().__init__(stub, **options)

    @property
    def timeout(self) -> float | None:
        return self._client.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        """pyetcd's __init__ sets it: ignored, the client's timeout applies."""


def _abandon(watcher: Any) -> None:
    """Fail every watch of ``watcher``, whose stream pyetcd has given up (later events
    from it find no callback and are ignored)."""
    with watcher._lock:
        callbacks, watcher._callbacks = watcher._callbacks, {}
    error = etcd_errors.ConnectionFailedError("the watch stream's etcd member was given up")
    for callback in callbacks.values():
        try:
            callback(error)
        except Exception:
            log.exception("watch callback failed")
