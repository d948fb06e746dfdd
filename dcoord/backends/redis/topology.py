"""The redis-py client for each Redis topology a URL names: one server, a primary that
Sentinel watches (redis-py follows it across failovers), or a Redis Cluster (redis-py
routes each command by its keys' hash slot and follows MOVED/ASK redirections).

Everything above this module talks to the client it returns; only what differs between
topologies (pub/sub, server info, replication) asks :attr:`Settings.topology`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from ...config import Settings

if TYPE_CHECKING:
    from . import RedisBackend

# What this client's type is, for the code that must tell: redis.Redis for a single
# server and for Sentinel's primary, RedisCluster for a Cluster.
Client = redis.Redis | RedisCluster


def endpoint(settings: Settings) -> str:
    """The servers, as shown in messages: ``host:port``, ``SERVICE@sentinels`` or the
    Cluster's startup nodes."""
    hosts = ",".join(f"{h}:{p}" for h, p in settings.hosts)
    if settings.topology == "sentinel":
        return f"{settings.service}@{hosts}"
    return hosts


def data_address(backend: RedisBackend) -> tuple[str, int]:
    """The (host, port) of a data node the backend's client talks to: with Sentinel the
    primary the sentinels name now (asked again), else the URL's first host."""
    if backend.settings.topology == "sentinel":
        client: Any = backend.redis
        pool = client.connection_pool  # a SentinelConnectionPool
        address: tuple[str, int] = backend.call(
            pool.get_master_address,
            what=f"ask the sentinels {endpoint(backend.settings)} for the primary",
            retry=True,
        )
        return address
    host, port = backend.settings.hosts[0]
    return host, port


def _tls(settings: Settings) -> dict[str, Any]:
    if not settings.tls:
        return {}
    return {
        "ssl": True,
        "ssl_ca_certs": settings.options["ca_cert"],
        "ssl_certfile": settings.options["cert_file"],
        "ssl_keyfile": settings.options["key_file"],
    }


def make_client(settings: Settings) -> Client:
    """A redis-py client for ``settings``; redis-py's own retry is off (see
    RedisBackend.call), connections are made on first use."""
    common: dict[str, Any] = {
        "username": settings.username,
        "password": settings.password,
        "socket_connect_timeout": settings.connect_timeout,
        "socket_timeout": settings.request_timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 30,
        "client_name": f"dcoord:{settings.namespace}",
        **_tls(settings),
    }
    if settings.topology == "cluster":
        node: Any = ClusterNode  # untyped in redis-py
        nodes = [node(host, port) for host, port in settings.hosts]
        return RedisCluster(startup_nodes=nodes, **common)
    if settings.topology == "sentinel":
        sentinel_options: dict[str, Any] = {
            "socket_connect_timeout": settings.connect_timeout,
            "socket_timeout": settings.request_timeout,
            "username": settings.options["sentinel_username"],
            "password": settings.options["sentinel_password"],
            **_tls(settings),
        }
        sentinels: Any = Sentinel  # untyped in redis-py
        sentinel = sentinels(list(settings.hosts), sentinel_kwargs=sentinel_options)
        primary: redis.Redis = sentinel.master_for(
            settings.service, db=int(settings.database), **common
        )
        return primary
    ((host, port),) = settings.hosts
    return redis.Redis(host=host, port=port, db=int(settings.database), **common)


def on_every_node(client: Client, method: str, *args: Any) -> dict[str, Any]:
    """``client.<method>(*args)`` by server: on a Cluster on every node (a replica is
    promoted with its own settings), keyed by node name; elsewhere on the one server
    the client talks to, keyed ``"server"``. For server-wide reads: INFO, CONFIG GET."""
    if isinstance(client, RedisCluster):
        return dict(getattr(client, method)(*args, target_nodes=RedisCluster.ALL_NODES))
    return {"server": getattr(client, method)(*args)}
