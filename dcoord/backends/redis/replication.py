"""Forced writes: a script followed by ``WAIT min_replicas`` on the same connection.

Redis replicates asynchronously: a primary acknowledges a write before any replica has
it, and a failover to a replica that lacks it loses it. ``WAIT n timeout`` answers how
many replicas acknowledged every earlier write *of its connection*, so it must follow
the write on that connection: the script and the WAIT go out in one non-transaction
pipeline (one round trip) on the connection of the primary that owns the keys (on a
Cluster, redis-py's node for the key's slot). WAIT does not block inside a script, hence
not part of it.

With ``min_replicas=0`` (the default) a forced write is the script alone: no WAIT, no
extra round trip. Fewer acknowledgements than asked raise BackendUnavailable: the write
is on the primary, which may still lose it in a failover, so the caller must treat its
outcome as unknown (the 2PC coordinator then reports no decision; see dcoord.twopc).
Even with enough acknowledgements Redis is not strongly consistent (its documentation
on WAIT): a replica acknowledges what it received, not what it fsynced, and Sentinel may
still promote a replica that lags. WAIT narrows the window, it does not close it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.cluster import RedisCluster

from ...errors import BackendUnavailable, ConfigError
from .locks import LuaScript

if TYPE_CHECKING:
    from . import RedisBackend


def check_acks(acks: object, min_replicas: int, timeout: float, what: str) -> None:
    """BackendUnavailable naming ``what`` if a WAIT answered fewer than ``min_replicas``
    (shared by the sync and the async forced writes)."""
    if int(str(acks)) < min_replicas:
        raise BackendUnavailable(
            f"{what}: only {acks} replica(s) of min_replicas={min_replicas} acknowledged "
            f"the write within replica_timeout={timeout:g} s; it is on the "
            "primary, but a failover may lose it"
        )


class Replication:
    """Runs the forced writes of one Redis backend (see the module docstring)."""

    def __init__(self, backend: RedisBackend) -> None:
        settings = backend.settings
        self._backend = backend
        self.min_replicas = int(settings.options["min_replicas"])
        self.timeout = float(settings.options["replica_timeout"])
        self._loaded: set[tuple[int, str]] = set()  # (id of a primary's client, sha)
        if self.min_replicas and self.timeout >= settings.request_timeout:
            # The WAIT's reply would arrive after the socket gave up on it.
            raise ConfigError(
                f"replica_timeout ({self.timeout:g} s) must be below request_timeout "
                f"({settings.request_timeout:g} s) when min_replicas is set"
            )

    def write(
        self, script: LuaScript, keys: Sequence[str], args: Sequence[Any], *, what: str
    ) -> Any:
        """Run ``script`` (keys in one slot) and, with ``min_replicas``, WAIT for that
        many replicas; raise BackendUnavailable if fewer acknowledged within the timeout.
        ``what`` names the write in that error. Call it inside :meth:`RedisBackend.call`
        (redis errors are mapped there)."""
        client = self._backend.redis
        if not self.min_replicas:
            return script(client, keys, args)
        primary: Any = self._primary_client(keys[0])
        if (id(primary), script.sha) not in self._loaded:
            # Loaded ahead, once per server: a refused EVALSHA would not stop the WAIT
            # behind it, which would then wait its full timeout for nothing.
            primary.execute_command("SCRIPT", "LOAD", script.source)
            self._loaded.add((id(primary), script.sha))
        result, acks = self._send(script, keys, args)
        if isinstance(result, redis.exceptions.NoScriptError):
            # The server restarted or failed over since: load, then send both again.
            primary = self._primary_client(keys[0])
            primary.execute_command("SCRIPT", "LOAD", script.source)
            result, acks = self._send(script, keys, args)
        elif isinstance(result, redis.exceptions.AskError):  # MovedError is one too
            # The slot moved since redis-py last read the Cluster's map: reread it.
            assert isinstance(client, RedisCluster)
            client.nodes_manager.initialize()
            result, acks = self._send(script, keys, args)
        if isinstance(result, Exception):
            raise result
        if isinstance(acks, Exception):
            raise acks
        check_acks(acks, self.min_replicas, self.timeout, what)
        return result

    def _send(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> list[Any]:
        """EVALSHA + WAIT in one pipeline; both replies, errors as values."""
        pipe: Any = self._primary_client(keys[0]).pipeline(transaction=False)
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        pipe.execute_command("WAIT", self.min_replicas, max(1, round(self.timeout * 1000)))
        return list(pipe.execute(raise_on_error=False))

    def _primary_client(self, key: str) -> redis.Redis:
        """A client whose pipeline runs on one connection to the primary owning ``key``."""
        client = self._backend.redis
        if isinstance(client, RedisCluster):
            cluster: Any = client  # untyped in redis-py
            node: redis.Redis = cluster.get_redis_connection(cluster.get_node_from_key(key))
            return node
        return client
