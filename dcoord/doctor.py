"""``dcoord doctor``: does this server give dcoord what its guarantees need?

Each check reads or tries something on the server and returns a :class:`Check`:
``pass``, ``fail`` (with a hint that says how to fix it) or ``info`` (nothing to judge,
or it cannot be measured on this backend; never a failure). Tries (the ACL/RBAC checks)
work on scratch keys under ``<namespace>/doctor/`` and remove them, pass or fail.
"""

from __future__ import annotations

import email.utils
import http.client
import secrets
import ssl
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from .backends.base import TX_STATES
from .errors import DcoordError

if TYPE_CHECKING:
    from .backends.etcd import EtcdBackend
    from .backends.redis import RedisBackend
    from .client import Client

Status = Literal["pass", "fail", "info"]

#: Oldest server versions dcoord is built and tested for.
MIN_REDIS = (7, 0)
MIN_ETCD = (3, 4)
#: Round trips measured for the RTT check.
RTT_SAMPLES = 5
#: A TTL must allow this many worst-case round trips: a renewal every TTL/3 that is
#: retried a few times before the lock runs out.
RTT_PER_TTL = 20


@dataclass(frozen=True)
class Check:
    """The outcome of one check."""

    name: str
    status: Status
    detail: str
    """What was found."""
    hint: str = ""
    """How to fix a failure (empty when it passed)."""

    def to_json(self) -> dict[str, str]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def run_checks(client: Client, ttl: float, clock: Callable[[], float] = time.time) -> list[Check]:
    """Every check of ``client``'s server, for locks and members with TTLs down to ``ttl``.

    ``clock`` is this machine's wall clock, the one the server's is compared with.
    """
    info = client.ping()
    rtt = _rtt_check(_round_trips(client), ttl, info.kind, client.capabilities.min_ttl)
    backend: Any = client.backend
    if info.kind == "redis":
        return [
            _version_check("redis", info.version, MIN_REDIS),
            rtt,
            *_redis_checks(backend, client.namespace, ttl, clock),
        ]
    if info.kind == "etcd":
        return [
            _version_check("etcd", info.version, MIN_ETCD),
            rtt,
            *_etcd_checks(backend, client.namespace, ttl, clock),
        ]
    return [
        Check("server", "pass", f"embedded memory store, dcoord {info.version}"),
        rtt,
        Check("clock offset", "pass", "0 s: the store runs on this process's clocks"),
        Check("durability", "info", "memory:// keeps nothing past this process"),
    ]


# -- the 2PC log's size -----------------------------------------------------------------

#: The transaction rate the size estimate is given for when the log shows none.
EXAMPLE_TX_RATE = 100
#: Records whose MEMORY USAGE is averaged (the newest finished ones).
SIZE_SAMPLE = 20


def _txlog_size(kind: str, records: int, finished: int, per_record: float, how: str) -> Check:
    """The formula, bytes per record x rate x retention, with the numbers found."""
    from .twopc import DEFAULT_RETENTION

    # Finished records stay for the retention: their count over it is the rate they
    # arrive at, if the log has been running that long with the default retention.
    rate = finished / DEFAULT_RETENTION if finished else EXAMPLE_TX_RATE
    where = "observed" if finished else "example"
    projected = per_record * rate * DEFAULT_RETENTION
    return Check(
        "txlog size",
        "info",
        f"{records} record(s) retained, {finished} finished; {per_record:.0f} B/record "
        f"({how}); bytes/record x rate x retention = {per_record:.0f} B x {rate:.2f}/s "
        f"({where}) x {DEFAULT_RETENTION:.0f} s (default retention) = "
        f"{projected / 1e6:.1f} MB on {kind} (docs/transactions.md, Retention)",
    )


def _redis_txlog_size(backend: RedisBackend) -> Check:
    from .backends.redis.slots import BUCKETS

    log = backend.txlog
    states = TX_STATES

    def read() -> tuple[dict[str, int], float]:
        pipe: Any = backend.redis.pipeline(transaction=False)
        for number in range(BUCKETS):
            for state in states:
                pipe.zcard(log.state_key(number, state))
        counts = pipe.execute()
        by_state = {s: sum(counts[i :: len(states)]) for i, s in enumerate(states)}
        newest = log.page(["committed", "aborted"], after=None, limit=SIZE_SAMPLE,
                          newest_first=True)  # fmt: skip
        usages = [backend.redis.memory_usage(log.record_key(t)) for _, t, _ in newest]
        sizes = [u for u in usages if u]
        # Each record also has an entry in its state's index and, finished, in the
        # expiry index: two sorted-set entries, ~190 B each (bench/scale_txlog.py).
        return by_state, (statistics.mean(sizes) if sizes else 500.0) + _REDIS_INDEX_BYTES

    try:
        by_state, per_record = backend.call(read, what="measure the 2PC log", retry=True)
    except DcoordError as exc:
        return Check("txlog size", "info", f"cannot be measured: {exc}")
    finished = by_state["committed"] + by_state["aborted"]
    how = "MEMORY USAGE of the newest records + their index entries"
    return _txlog_size("redis", sum(by_state.values()), finished, per_record, how)


#: Redis memory of a record's index entries, beyond MEMORY USAGE of its key (measured
#: with bench/scale_txlog.py: used_memory grows ~900 B per 3-participant record, of
#: which MEMORY USAGE of the record key is ~500).
_REDIS_INDEX_BYTES = 400.0


def _etcd_txlog_size(backend: EtcdBackend) -> Check:
    log = backend.txlog

    def read() -> tuple[int, int, int]:
        def count(directory: str) -> int:
            return int(backend.etcd.get_prefix_response(directory, count_only=True).count)

        finished = count(log.index_prefix("committed")) + count(log.index_prefix("aborted"))
        total = sum(count(log.index_prefix(s)) for s in TX_STATES)
        return total, finished, int(backend.etcd.status().db_size)

    try:
        records, finished, db_size = backend.call(read, what="measure the 2PC log", retry=True)
    except DcoordError as exc:
        return Check("txlog size", "info", f"cannot be measured: {exc}")
    # The database holds everything else too, and old revisions until compaction: per
    # record it is an upper bound; with no records, the measured ~2,750 B stands in.
    per_record = db_size / records if records else float(_ETCD_RECORD_BYTES)
    how = "db size / records, an upper bound" if records else "measured by bench/scale_txlog.py"
    return _txlog_size("etcd", records, finished, per_record, how)


#: etcd database bytes per 3-participant committed record (bench/scale_txlog.py).
_ETCD_RECORD_BYTES = 2_750


# -- common -----------------------------------------------------------------------------


def _version_check(kind: str, version: str, minimum: tuple[int, int]) -> Check:
    wanted = ".".join(map(str, minimum))
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return Check(
            "server",
            "fail",
            f"{kind} version {version!r} does not parse",
            f"use {kind} {wanted} or newer",
        )
    if found < minimum:
        return Check("server", "fail", f"{kind} {version}", f"upgrade to {kind} {wanted} or newer")
    return Check("server", "pass", f"{kind} {version}")


def _round_trips(client: Client) -> list[float]:
    rtts = []
    for _ in range(RTT_SAMPLES):
        started = time.perf_counter()
        client.ping()
        rtts.append(time.perf_counter() - started)
    return rtts


def _rtt_check(rtts: list[float], ttl: float, kind: str, min_ttl: float) -> Check:
    worst = max(rtts)
    smallest = max(RTT_PER_TTL * worst, min_ttl)
    detail = (
        f"median {statistics.median(rtts) * 1000:.2f} ms, worst {worst * 1000:.2f} ms of "
        f"{len(rtts)}; smallest sensible TTL {smallest:.3g} s (TTL in use {ttl:g} s)"
    )
    if ttl < smallest:
        why = f"{kind}'s minimum lease" if smallest == min_ttl else "the round trip"
        return Check(
            "round trip",
            "fail",
            detail,
            f"use ttl >= {smallest:.3g} s ({why}): a renewal at TTL/3 needs time for retries",
        )
    return Check("round trip", "pass", detail)


def _attempt(refused: list[str], what: str, fn: Callable[[], object]) -> None:
    """Run ``fn``; when the server refuses it, note ``what`` and why in ``refused``."""
    try:
        fn()
    except DcoordError as exc:
        refused.append(f"{what}: {exc}")
    except Exception as exc:  # a refusal raw from the client library: report, go on
        refused.append(f"{what}: {type(exc).__name__}: {exc}")


# -- Redis ------------------------------------------------------------------------------


def _redis_checks(
    backend: RedisBackend, namespace: str, ttl: float, clock: Callable[[], float]
) -> list[Check]:
    from .backends.redis import persistence

    checks = []
    found = persistence.read(backend)
    if isinstance(found, str):
        checks.append(
            Check(
                "persistence",
                "fail",
                f"cannot be read: {found}",
                "grant this user CONFIG GET (or INFO) so that doctor and dcoord can check",
            )
        )
    else:
        checks.append(_redis_persistence(found))
        checks.append(_redis_eviction(found))
    checks.append(_redis_replication(found))
    checks.append(_redis_clock(backend, ttl, clock))
    checks.append(_redis_acl(backend, namespace))
    checks.append(_redis_world_writable(backend, namespace))
    checks.append(_redis_txlog_size(backend))
    return checks


def _redis_persistence(found: Any) -> Check:
    detail = f"appendonly {found.appendonly or '?'}, appendfsync {found.appendfsync or '?'}"
    if found.appendonly != "yes":
        return Check(
            "persistence",
            "fail",
            detail + ": a server restart forgets locks, fences and transaction decisions",
            "CONFIG SET appendonly yes and CONFIG SET appendfsync always (and in redis.conf)",
        )
    if found.appendfsync != "always":
        return Check(
            "persistence",
            "fail",
            detail
            + ": a server crash can lose the last second of writes"
            + (f" ({found.unread})" if found.appendfsync is None else ""),
            "CONFIG SET appendfsync always (and in redis.conf); see docs/transactions.md",
        )
    return Check("persistence", "pass", detail)


def _redis_eviction(found: Any) -> Check:
    policy = found.maxmemory_policy
    if policy == "noeviction":
        return Check("maxmemory-policy", "pass", "noeviction")
    return Check(
        "maxmemory-policy",
        "fail",
        f"{policy or 'unreadable'}: under memory pressure redis may evict held locks "
        "(a second holder) and transaction records",
        "CONFIG SET maxmemory-policy noeviction (and in redis.conf)",
    )


def _redis_replication(found: Any) -> Check:
    """Who has a copy of an acknowledged write when a replica is promoted."""
    replication = None if isinstance(found, str) else found.replication
    if replication is None:
        return Check(
            "replication",
            "fail",
            "INFO replication cannot be read",
            "grant this user INFO so that doctor and dcoord can check",
        )
    detail = replication.describe()
    if replication.role != "master":
        return Check(
            "replication",
            "fail",
            f"{detail}: connected to a {replication.role}, which refuses writes or may be "
            "promoted without them",
            "point the URL at the primary",
        )
    if replication.min_replicas > replication.connected_replicas:
        return Check(
            "replication",
            "fail",
            f"{detail}: every forced decision-log write waits for more replicas than "
            "there are, and fails",
            "connect more replicas, or lower the URL option min_replicas",
        )
    if replication.connected_replicas == 0 and not replication.failover:
        return Check("replication", "info", "single server, no replicas")
    if replication.failover and replication.min_replicas < 1:
        # Sentinel and Cluster promote a replica by themselves, and replication is
        # asynchronous: only a write that waited for a replica survives for sure.
        return Check(
            "replication",
            "fail",
            detail + ": a failover can lose acknowledged transaction decisions",
            "add min_replicas=1 to the URL (a forced decision then waits for a replica)",
        )
    if replication.min_replicas < 1 and (replication.min_replicas_to_write or 0) < 1:
        return Check(
            "replication",
            "fail",
            detail + ": a failover can lose acknowledged grants (a lock held twice) and decisions",
            "CONFIG SET min-replicas-to-write 1 (and min-replicas-max-lag), or add "
            "min_replicas=1 to the URL",
        )
    return Check("replication", "pass", detail)


def _redis_clock(backend: RedisBackend, ttl: float, clock: Callable[[], float]) -> Check:
    client: Any = backend.redis

    def read() -> tuple[float, float, float]:
        before = clock()
        seconds, micros = client.time()
        return before, seconds + micros / 1e6, clock()

    before, server, after = backend.call(read, what="read redis TIME", retry=True)
    return _offset_check(server - (before + after) / 2, (after - before) / 2, ttl)


def _offset_check(offset: float, error: float, ttl: float) -> Check:
    """The verdict on ``offset`` (server - local, seconds) measured to +/- ``error``."""
    limit = min(1.0, ttl / 10)
    detail = f"server - local = {offset * 1000:+.1f} ms (+/- {error * 1000:.1f} ms)"
    if abs(offset) - error > limit:
        return Check(
            "clock offset",
            "fail",
            detail + f", more than {limit:g} s: transaction deadlines and lock ages read "
            "by this machine are off by as much",
            "run NTP (chrony, systemd-timesyncd) on this machine and on the server",
        )
    return Check("clock offset", "pass", detail)


# Every command dcoord sends, on scratch keys (scripts run their commands under the same
# ACL as the caller: each is tried inside EVAL too).
_REDIS_TRIES: tuple[tuple[str, ...], ...] = (
    ("SET", "{k}", "1", "NX", "PX", "10000"),
    ("GET", "{k}"),
    ("PTTL", "{k}"),
    ("PEXPIRE", "{k}", "10000"),
    ("INCR", "{k}:n"),
    ("HSET", "{k}:h", "f", "v"),
    ("HGETALL", "{k}:h"),
    ("ZADD", "{k}:z", "1", "m"),
    ("ZRANGEBYSCORE", "{k}:z", "-inf", "+inf"),
    ("PUBLISH", "{k}:c", "x"),
    ("TIME",),
    ("SCAN", "0", "MATCH", "{k}*"),
)


def _redis_acl(backend: RedisBackend, namespace: str) -> Check:
    client: Any = backend.redis
    sharded = backend.settings.topology == "cluster"
    # One hash tag: on a Cluster the DEL and EXISTS of every scratch key are one slot.
    key = f"{backend.prefix}doctor:{{{secrets.token_hex(4)}}}"
    refused: list[str] = []
    scratch = [key, f"{key}:n", f"{key}:h", f"{key}:z"]
    try:
        for command in _REDIS_TRIES:
            args = [a.replace("{k}", key) for a in command]
            if sharded and args[0] == "PUBLISH":  # what dcoord sends there (locks.py)
                args[0] = "SPUBLISH"
            _attempt(refused, args[0], lambda: client.execute_command(*args))  # noqa: B023
        _attempt(
            refused,
            "EVAL (SET/PTTL/DEL in a script)",
            lambda: client.execute_command(
                "EVAL",
                "redis.call('SET', KEYS[1], '1', 'PX', 10000) redis.call('PTTL', KEYS[1]) "
                "return redis.call('DEL', KEYS[1])",
                1,
                key,
            ),
        )
        _attempt(refused, "SCRIPT LOAD + EVALSHA", lambda: _evalsha(client))
        _attempt(
            refused,
            "SSUBSCRIBE" if sharded else "SUBSCRIBE",
            lambda: _subscribe(client, f"{key}:c", sharded),
        )
        _attempt(refused, "DEL", lambda: client.execute_command("DEL", *scratch))
    finally:
        leftover = _quietly(lambda: client.execute_command("EXISTS", *scratch))
    detail = f"{len(_REDIS_TRIES) + 4} commands tried on {key}*"
    if leftover:
        refused.append(f"{leftover} scratch key(s) left behind under {key}")
    if refused:
        return Check(
            "permissions",
            "fail",
            detail + "; refused: " + "; ".join(refused),
            f"allow these commands on keys and channels dcoord:{namespace}:* "
            "(e.g. ACL SETUSER <user> ~dcoord:* &dcoord:* +@read +@write +@scripting "
            "+@pubsub +time +ping +info)",
        )
    return Check("permissions", "pass", detail + ", all allowed; nothing left behind")


def _evalsha(client: Any) -> None:
    # script_load: on a Cluster it loads on every primary and answers one SHA.
    sha = client.script_load("return 1")
    client.evalsha(sha, 0)


def _subscribe(client: Any, channel: str, sharded: bool) -> None:
    pubsub = client.pubsub()
    kind = "ssubscribe" if sharded else "subscribe"
    get = pubsub.get_sharded_message if sharded else pubsub.get_message
    try:
        getattr(pubsub, kind)(channel)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            message = get(timeout=0.5)
            if message is not None and message["type"] == kind:
                return
        raise TimeoutError("no subscribe confirmation in 2 s")
    finally:
        pubsub.close()


def _quietly(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:
        return None


def _redis_world_writable(backend: RedisBackend, namespace: str) -> Check:
    import redis

    from .backends.redis import topology

    if backend.settings.password is None:
        return Check(
            "open access",
            "info",
            "the URL has no password: whoever reaches the port may take or drop any lock",
        )
    # The data node, not (with Sentinel) a sentinel, which would refuse SET either way.
    host, port = topology.data_address(backend)
    key = f"{backend.prefix}doctor:{secrets.token_hex(4)}:anonymous"
    anonymous = redis.Redis(
        host=host,
        port=port,
        socket_connect_timeout=backend.settings.connect_timeout,
        socket_timeout=backend.settings.request_timeout,
        ssl=backend.settings.tls,
        ssl_ca_certs=backend.settings.options["ca_cert"],
    )
    try:
        try:
            written = anonymous.set(key, "1", nx=True, px=10000)
        except redis.RedisError as exc:
            return Check("open access", "pass", f"a client without a password is refused: {exc}")
        _quietly(lambda: anonymous.delete(key))
        return Check(
            "open access",
            "fail",
            f"a client WITHOUT a password could write {key} (written: {bool(written)}): "
            "the 'default' user is enabled with nopass, so anyone can take or drop locks",
            "ACL SETUSER default off (or requirepass), and give dcoord its own user",
        )
    finally:
        anonymous.close()


# -- etcd -------------------------------------------------------------------------------


def _etcd_checks(
    backend: EtcdBackend, namespace: str, ttl: float, clock: Callable[[], float]
) -> list[Check]:
    return [
        _etcd_cluster(backend),
        _etcd_clock(backend, ttl, clock),
        _etcd_rbac(backend, namespace),
        _etcd_world_writable(backend, namespace),
        _etcd_txlog_size(backend),
    ]


# How long to watch the HTTP Date header for its second to change (a second at most).
_DATE_WATCH = 1.5


def _etcd_clock(backend: EtcdBackend, ttl: float, clock: Callable[[], float]) -> Check:
    """The server's clock from the ``Date`` header of its HTTP answers (same client port).

    etcd's API carries no wall-clock time, but its HTTP endpoints answer with a Date
    header in whole seconds. Asking until that second changes pins the server's second
    boundary between two answers, to within their round trip.
    """
    host, port = backend.settings.hosts[0]
    options = backend.settings.options
    context = None
    if backend.settings.tls:
        context = ssl.create_default_context(cafile=options["ca_cert"])
        if options["cert_file"]:
            context.load_cert_chain(options["cert_file"], options["key_file"])
    previous: tuple[float, int] | None = None  # (local time sent, server second)
    deadline = time.monotonic() + _DATE_WATCH
    try:
        while time.monotonic() < deadline:
            sent = clock()
            second = _http_date(host, port, context, backend.settings.request_timeout)
            received = clock()
            if previous is not None and second > previous[1]:
                boundary = (previous[0] + received) / 2
                return _offset_check(second - boundary, (received - previous[0]) / 2, ttl)
            previous = (sent, second)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return Check(
            "clock offset",
            "info",
            f"cannot be measured: etcd's HTTP endpoint did not answer with a Date ({exc}); "
            "transaction deadlines on etcd use each client's clock, so keep NTP on",
        )
    return Check("clock offset", "info", "cannot be measured: the server's Date did not change")


def _http_date(host: str, port: int, context: ssl.SSLContext | None, timeout: float) -> int:
    """The Unix second of the Date header of etcd's answer to GET /version."""
    connection: http.client.HTTPConnection = (
        http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        if context is not None
        else http.client.HTTPConnection(host, port, timeout=timeout)
    )
    try:
        connection.request("GET", "/version")
        response = connection.getresponse()
        response.read()
        date = response.getheader("Date")
    finally:
        connection.close()
    if date is None:
        raise ValueError("no Date header")
    return int(email.utils.parsedate_to_datetime(date).timestamp())


def _etcd_cluster(backend: EtcdBackend) -> Check:
    etcd: Any = backend.etcd

    def read() -> tuple[list[Any], Any, list[Any]]:
        return list(etcd.members), etcd.status(), list(etcd.list_alarms())

    members, status, alarms = backend.call(read, what="read etcd cluster", retry=True)
    names = ", ".join(sorted(m.name or f"{m.id:x}" for m in members))
    detail = f"{len(members)} member(s) ({names}); leader {status.leader.name or '?'}"
    if alarms:
        return Check(
            "cluster health",
            "fail",
            detail + f"; alarms: {', '.join(str(a.alarm_type) for a in alarms)}",
            "etcdctl alarm list; free space (compact + defrag) and etcdctl alarm disarm",
        )
    if len(members) % 2 == 0:
        return Check(
            "cluster health",
            "fail",
            detail + ": an even member count tolerates no more failures than one fewer",
            "run an odd number of members (1, 3 or 5)",
        )
    return Check("cluster health", "pass", detail)


def _etcd_rbac(backend: EtcdBackend, namespace: str) -> Check:
    etcd: Any = backend.etcd
    key = f"{backend.prefix}doctor/{secrets.token_hex(4)}"
    refused: list[str] = []
    lease: Any = None

    def call(what: str, fn: Callable[[], Any]) -> Any:
        return backend.call(fn, what=what)

    def grant() -> None:
        nonlocal lease
        lease = call("lease grant", lambda: etcd.lease(10))

    try:
        _attempt(refused, "put", lambda: call("put", lambda: etcd.put(key, b"1")))
        _attempt(refused, "get", lambda: call("get", lambda: etcd.get(key)))
        _attempt(refused, "range", lambda: call("range", lambda: list(etcd.get_prefix(key))))
        _attempt(
            refused,
            "txn",
            lambda: call(
                "txn",
                lambda: etcd.transaction(
                    compare=[etcd.transactions.create(key) > 0],
                    success=[etcd.transactions.get(key)],
                    failure=[],
                ),
            ),
        )
        _attempt(refused, "lease grant", grant)
        if lease is not None:
            _attempt(
                refused,
                "put with lease",
                lambda: call("put", lambda: etcd.put(key, b"2", lease=lease)),
            )
            _attempt(
                refused,
                "lease keep-alive",
                lambda: call("keep-alive", lambda: list(lease.refresh())),
            )
        _attempt(refused, "watch", lambda: _etcd_watch(backend, key))
        _attempt(refused, "delete", lambda: call("delete", lambda: etcd.delete(key)))
    finally:
        if lease is not None:
            _quietly(lambda: etcd.revoke_lease(lease.id))
        left = _quietly(lambda: etcd.get(key)[0])
    if left is not None:
        refused.append(f"scratch key {key} left behind")
    detail = f"put, get, range, txn, lease, watch, delete tried on {key}"
    if refused:
        return Check(
            "permissions",
            "fail",
            detail + "; refused: " + "; ".join(refused),
            f"etcdctl role grant-permission --prefix=true <role> readwrite /dcoord/{namespace}/",
        )
    return Check("permissions", "pass", detail + ", all allowed; nothing left behind")


def _etcd_watch(backend: EtcdBackend, key: str) -> None:
    etcd: Any = backend.etcd
    watch_id = backend.call(
        lambda: etcd.add_watch_callback(key, lambda _response: None), what="watch"
    )
    etcd.cancel_watch(watch_id)


def _etcd_world_writable(backend: EtcdBackend, namespace: str) -> Check:
    import pyetcd

    settings = backend.settings
    if settings.password is None:
        return Check(
            "open access",
            "info",
            "the URL has no user: if etcd auth is off, whoever reaches it may take or drop "
            "any lock",
        )
    host, port = settings.hosts[0]
    key = f"{backend.prefix}doctor/{secrets.token_hex(4)}-anonymous"
    anonymous: Any = pyetcd.client(
        host=host,
        port=port,
        timeout=settings.request_timeout,
        ca_cert=settings.options["ca_cert"] if settings.tls else None,
    )
    try:
        try:
            anonymous.put(key, b"1")
        except Exception as exc:
            return Check(
                "open access", "pass", f"a client without credentials is refused: {exc!r:.80}"
            )
        _quietly(lambda: anonymous.delete(key))
        return Check(
            "open access",
            "fail",
            f"a client WITHOUT credentials could write {key}: etcd auth is off",
            "etcdctl user add root; etcdctl auth enable (and give dcoord its own user/role)",
        )
    finally:
        anonymous.close()
