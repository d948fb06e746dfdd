"""The 2PC decision log on Redis; every change is one Lua script, so it is atomic.

Keys, in :data:`~.slots.BUCKETS` buckets (``B`` = :func:`~.slots.bucket` of the txid,
two digits), each bucket one hash tag, hence one Cluster slot::

    dcoord:<ns>:tx:{<ns>:tx:B}:r:<txid>   the record (JSON); finished ones expire (PX
                                          retention)
    dcoord:<ns>:tx:{<ns>:tx:B}:open       sorted set of the bucket's unfinished txids,
                                          scored by deadline
    dcoord:<ns>:tx:{<ns>:tx:B}:s:<state>  sorted set of the bucket's txids in <state>,
                                          scored by creation time (the listing's index)
    dcoord:<ns>:tx:{<ns>:tx:B}:done       sorted set of the bucket's finished txids,
                                          scored by when their record expires (server
                                          ms): a finishing write drops up to 16 entries
                                          past it from the state indexes

A record and the index its compare-and-set updates share a slot, so create and CAS stay
one script on every topology, and the buckets spread the log over up to
:data:`~.slots.BUCKETS` primaries of a Cluster. Listing the unfinished transactions reads
every bucket (one pipeline: one round trip on one server), so it still costs time in
proportion to the unfinished records, not to the log's history. A page of the listing
reads at most ``limit + 1`` entries of each (bucket, state) index, again one pipeline,
then the page's records with one MGET per bucket. The namespace is in the
tag so that namespaces do not all crowd the same sixteen slots.

Before this layout, one server held ``dcoord:<ns>:tx:r:<txid>`` and one index
``dcoord:<ns>:tx:unfinished``. Such an index may still exist in a live deployment (never
on a Cluster: that layout could not run there). Each client moves its unfinished records
into their buckets before its first use of the log, and every listing of unfinished
transactions moves any that appeared since (written by a process of the old version):
see :meth:`RedisTxLog._migrate_legacy`. Finished records of the old layout are not
moved; they expire after their retention as before, and until then only ``get`` of the
old key (``redis-cli``) shows them. Records written before the state indexes existed
appear in listings once they change state again (finished ones never: they expire).

Compare-and-set compares the record's exact bytes (the record only grows along the
state machine, so equal bytes mean no change). Create and every CAS are forced writes
(:class:`.replication.Replication`: with ``min_replicas``, WAIT for replicas). How
durable a record is depends on the server's persistence and eviction policy: see
:mod:`.persistence`.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import os
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis

from ...core.twopc_state import Cas, run
from ..base import TX_STATES, LogEntry
from . import persistence
from .locks import LuaScript, _pipeline
from .scripts import lua
from .slots import BUCKETS, bucket, mget

if TYPE_CHECKING:
    from . import RedisBackend

# The server clock is read with TIME at most this often and carried forward on the local
# monotonic clock in between, so that TIME is not a round trip on every commit's path.
_CLOCK_REREAD = 5.0

CREATE = LuaScript(lua("txlog_create", checked=True))
CAS = LuaScript(lua("txlog_cas", checked=True))
MIGRATE = LuaScript(lua("txlog_migrate", checked=True))


@functools.lru_cache(maxsize=4096)
def _bucket_prefix(prefix: str, namespace: str, number: int) -> str:
    # Cached: every log write names several keys of one bucket (a CAS seven), and the
    # (prefix, namespace, bucket) triples a process uses are few.
    return f"{prefix}{{{namespace}:tx:{number:02d}}}:"


def record_key(prefix: str, namespace: str, txid: str) -> str:
    """The key of ``txid``'s record under the log's ``prefix`` (``dcoord:<ns>:tx:``);
    shared by the sync and the async log."""
    return f"{_bucket_prefix(prefix, namespace, bucket(txid))}r:{txid}"


def index_key(prefix: str, namespace: str, number: int) -> str:
    """The key of bucket ``number``'s index of unfinished transactions."""
    return f"{_bucket_prefix(prefix, namespace, number)}open"


def state_key(prefix: str, namespace: str, number: int, state: str) -> str:
    """The key of bucket ``number``'s index of the txids in ``state``."""
    return f"{_bucket_prefix(prefix, namespace, number)}s:{state}"


def create_call(
    prefix: str, namespace: str, txid: str, data: bytes, deadline: float, created: float | None
) -> tuple[list[str], list[Any]]:
    """The keys and arguments of ``CREATE`` for ``txid`` (the sync and async logs')."""
    number = bucket(txid)
    keys = [
        record_key(prefix, namespace, txid),
        index_key(prefix, namespace, number),
        state_key(prefix, namespace, number, "started"),
    ]
    when = deadline if created is None else created
    return keys, [data, repr(deadline), txid, repr(when)]


def cas_call(
    prefix: str,
    namespace: str,
    txid: str,
    expected: LogEntry,
    data: bytes,
    *,
    finished: bool,
    retention: float,
    state: str,
    created: float,
    previous: str | None,
) -> tuple[list[str], list[Any]]:
    """The keys and arguments of ``CAS`` for ``txid`` (the sync and async logs')."""
    number = bucket(txid)
    keys = [
        record_key(prefix, namespace, txid),
        index_key(prefix, namespace, number),
        state_key(prefix, namespace, number, state),
        f"{_bucket_prefix(prefix, namespace, number)}done",
        state_key(prefix, namespace, number, "committed"),
        state_key(prefix, namespace, number, "aborted"),
        *(
            state_key(prefix, namespace, number, s)
            for s in ((previous,) if previous else TX_STATES)
        ),
    ]
    retention_ms = max(1, int(retention * 1000))
    args = [expected.data, data, "1" if finished else "0", retention_ms, txid, repr(created)]
    return keys, args


class _KeptConnections:
    """Connections of a single server's pool that the log keeps for its forced writes.

    Each write takes an idle one from this list (the pool's when it is empty) and puts it
    back, so a commit's two writes skip redis-py's per-use pool bookkeeping (a lock,
    connection-count metrics, events: ~10 us of client CPU per write, measured). As the
    pool does, a connection is checked before use (one poll): one the server closed is
    reconnected, and one whose reply was not read (a timeout, a broken connection, an
    interrupt) is closed and handed back, never kept (as :func:`.locks._execute` does).
    The pool still owns them all: closing the client closes them. Only for a plain
    single server: a Sentinel pool must see its connections again to drop those of a
    demoted primary.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._pool: Any = client.connection_pool  # untyped in redis-py
        self._idle: list[Any] = []  # append/pop are atomic: no lock
        self._pid = os.getpid()

    def execute(self, *args: Any) -> Any:
        """``args`` as one command; its raw reply."""
        connection = self._take()
        try:
            connection.send_command(*args)
            reply = connection.read_response()
        except redis.ResponseError:
            self._idle.append(connection)  # an error reply: the connection is in order
            raise
        except BaseException:
            connection.disconnect()
            self._pool.release(connection)
            raise
        self._idle.append(connection)
        return reply

    def _take(self) -> Any:
        if self._pid != os.getpid():  # a forked child: the parent's sockets are not its own
            self._idle, self._pid = [], os.getpid()
        try:
            connection = self._idle.pop()
        except IndexError:
            return self._pool.get_connection()
        try:
            stale = connection.can_read()  # data before a request: closed, or out of step
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            stale = True
        if stale:
            connection.disconnect()  # connects again as it sends
        return connection


def page_keys(prefix: str, namespace: str, states: Sequence[str]) -> list[str]:
    """Every (bucket, state) index a page of ``states`` reads."""
    return [state_key(prefix, namespace, n, s) for n in range(BUCKETS) for s in states]


class RedisTxLog:
    def __init__(self, backend: RedisBackend, prefix: str) -> None:
        self._backend = backend
        self._redis = backend.redis
        self._prefix = f"{prefix}tx:"
        self._namespace = backend.settings.namespace
        self._legacy_records = f"{prefix}tx:r:"
        self._legacy_index = f"{prefix}tx:unfinished"
        # The old layout can exist only where it could run: on one server.
        self._legacy_possible = backend.settings.topology != "cluster"
        self._migrated = threading.Event()
        self._clock_mutex = threading.Lock()
        self._clock: tuple[float, float] | None = None  # (server time, monotonic at reply)
        self._kept = (
            _KeptConnections(cast("redis.Redis", self._redis))
            if backend.settings.topology == "single" and not backend.replication.min_replicas
            else None
        )

    def record_key(self, txid: str) -> str:
        """The key of ``txid``'s record."""
        return record_key(self._prefix, self._namespace, txid)

    def index_key(self, number: int) -> str:
        """The key of bucket ``number``'s index of unfinished transactions."""
        return index_key(self._prefix, self._namespace, number)

    def state_key(self, number: int, state: str) -> str:
        """The key of bucket ``number``'s index of the txids in ``state``."""
        return state_key(self._prefix, self._namespace, number, state)

    def create(
        self, txid: str, data: bytes, deadline: float, created: float | None = None
    ) -> LogEntry | None:
        what = f"create transaction record {txid!r}"
        self._ensure_migrated(what)
        keys, args = create_call(self._prefix, self._namespace, txid, data, deadline, created)
        done = self._backend.call(lambda: self._write(CREATE, keys, args, what), what=what)
        return LogEntry(bytes(data), bytes(data)) if done else None

    def cas(
        self,
        txid: str,
        expected: LogEntry,
        data: bytes,
        *,
        finished: bool,
        retention: float,
        state: str,
        created: float,
        previous: str | None = None,
    ) -> LogEntry | None:
        what = f"update transaction record {txid!r}"
        self._ensure_migrated(what)
        keys, args = cas_call(
            self._prefix,
            self._namespace,
            txid,
            expected,
            data,
            finished=finished,
            retention=retention,
            state=state,
            created=created,
            previous=previous,
        )
        changed = self._backend.call(lambda: self._write(CAS, keys, args, what), what=what)
        return LogEntry(bytes(data), bytes(data)) if changed else None

    def _write(self, script: LuaScript, keys: list[str], args: list[Any], what: str) -> Any:
        """A forced write (:meth:`.replication.Replication.write`): on a single server with
        no replicas to wait for, the script on a kept connection (see _KeptConnections)."""
        if self._kept is None:
            return self._backend.replication.write(script, keys, args, what=what)
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return self._kept.execute(*command)
        except redis.exceptions.NoScriptError:  # first use on this server, or it restarted
            self._kept.execute("SCRIPT", "LOAD", script.source)
            return self._kept.execute(*command)

    def cas_many(self, requests: Sequence[Cas], *, retention: float) -> list[LogEntry | None]:
        """Several :meth:`cas` at once, each applied or not on its own, as one pipeline
        on one server: one round trip, and one fsync for all of them (they arrive in one
        event-loop iteration). The coordinator's ``done`` writes, which nothing waits
        for, share it. Where one pipeline is not one server's forced write (a Cluster
        spreads the buckets over primaries; ``min_replicas`` needs a WAIT per write),
        they are made one by one."""
        if self._backend.settings.topology == "cluster" or self._backend.replication.min_replicas:
            return [
                self.cas(r.txid, r.expected, r.data, finished=r.finished, retention=retention,
                         state=r.state, created=r.created, previous=r.previous)
                for r in requests
            ]  # fmt: skip
        what = f"update {len(requests)} transaction records"
        self._ensure_migrated(what)
        calls = [
            cas_call(self._prefix, self._namespace, r.txid, r.expected, r.data,
                     finished=r.finished, retention=retention, state=r.state,
                     created=r.created, previous=r.previous)
            for r in requests
        ]  # fmt: skip

        def send() -> list[Any]:
            # One server here (not a Cluster), so redis.Redis: the scripts go out on a
            # pooled connection directly, as the lock renewals' (no redis-py pipeline's
            # per-command bookkeeping, which cost more than the Lua).
            client = cast("redis.Redis", self._redis)
            commands = [("EVALSHA", CAS.sha, len(keys), *keys, *args) for keys, args in calls]
            replies = _pipeline(client, commands)
            for i, reply in enumerate(replies):
                if isinstance(reply, redis.exceptions.NoScriptError):
                    replies[i] = CAS(self._redis, *calls[i])  # loads it (a restarted server)
                elif isinstance(reply, Exception):
                    raise reply  # not about one record (ACL, OOM, a replica): about all
            return replies

        replies = self._backend.call(send, what=what)
        return [
            LogEntry(bytes(r.data), bytes(r.data)) if done else None
            for r, done in zip(requests, replies, strict=True)
        ]

    def get(self, txid: str) -> LogEntry | None:
        what = f"read transaction record {txid!r}"
        self._ensure_migrated(what)
        data = self._backend.call(
            lambda: cast("bytes | None", self._redis.get(self.record_key(txid))),
            what=what,
            retry=True,
        )
        return None if data is None else LogEntry(data, data)

    def unfinished(self, limit: int | None = None) -> list[tuple[str, LogEntry | None]]:
        def read() -> list[tuple[str, LogEntry | None]]:
            end = -1 if limit is None else limit - 1
            indexes = self._indexes(end, legacy=self._legacy_possible)
            if self._legacy_possible:
                legacy = indexes.pop()
                if legacy:  # written by a process of the old version since we looked
                    self._migrate_legacy(legacy)
                    indexes = self._indexes(end, legacy=False)
            # Each bucket is sorted by deadline: merge them, earliest first (ties by txid,
            # as the other stores order them).
            merged = heapq.merge(*([(score, m.decode()) for m, score in i] for i in indexes))
            txids = [txid for _, txid in merged][:limit]
            values = mget(self._redis, [self.record_key(t) for t in txids])
            return [
                (t, None if v is None else LogEntry(v, v))
                for t, v in zip(txids, values, strict=True)
            ]

        return self._backend.call(read, what="list unfinished transactions", retry=True)

    def _indexes(self, end: int, *, legacy: bool) -> list[list[tuple[bytes, float]]]:
        """Entries 0..``end`` of every bucket's index (and with ``legacy``, all of the old
        layout's index, last), in one pipeline."""
        pipe: Any = self._redis.pipeline(transaction=False)
        for number in range(BUCKETS):
            pipe.zrange(self.index_key(number), 0, end, withscores=True)
        if legacy:
            pipe.zrange(self._legacy_index, 0, -1, withscores=True)
        return cast("list[list[tuple[bytes, float]]]", pipe.execute())

    def page(
        self,
        states: Sequence[str],
        *,
        after: tuple[float, str] | None,
        limit: int,
        newest_first: bool,
    ) -> list[tuple[float, str, LogEntry | None]]:
        keys = page_keys(self._prefix, self._namespace, states)

        def read() -> list[tuple[float, str, LogEntry | None]]:
            entries = run(past_cursor(keys, after, limit, newest_first), self._zranges)
            values = mget(self._redis, [self.record_key(t) for _, t in entries])
            return [
                (created, txid, None if v is None else LogEntry(v, v))
                for (created, txid), v in zip(entries, values, strict=True)
            ]

        return self._backend.call(read, what="list transactions", retry=True)

    def _zranges(self, ranges: list[ZRange]) -> list[list[tuple[bytes, float]]]:
        """The replies of ``ranges``, in one pipeline."""
        pipe: Any = self._redis.pipeline(transaction=False)
        for zrange in ranges:
            zrange.queue(pipe)
        return cast("list[list[tuple[bytes, float]]]", pipe.execute())

    def _ensure_migrated(self, what: str) -> None:
        """Move the unfinished records of the old layout, once per client, before the
        operation ``what`` (which errors name)."""
        if self._migrated.is_set() or not self._legacy_possible:
            return
        found = self._backend.call(
            lambda: cast(
                "list[tuple[bytes, float]]",
                self._redis.zrange(self._legacy_index, 0, -1, withscores=True),
            ),
            what=f"{what} (first looking for records of the old layout)",
            retry=True,
        )
        if found:
            self._backend.call(
                lambda: self._migrate_legacy(found),
                what=f"{what} (first moving records of the old layout)",
                retry=True,
            )
        self._migrated.set()

    def _migrate_legacy(self, found: list[tuple[bytes, float]]) -> None:
        """Move the records of old-layout index entries ``found`` into their buckets.

        One script per record: the record, its old index entry, its new key and its
        bucket's index change together, so a crash leaves each record in one layout or
        the other, never in neither; repeating it is harmless. The four keys lie in
        different slots, which one server (the only place the old layout exists) runs.
        """
        for member, score in found:
            txid = member.decode()
            keys = [
                self._legacy_records + txid,
                self._legacy_index,
                self.record_key(txid),
                self.index_key(bucket(txid)),
            ]
            self._backend.replication.write(
                MIGRATE, keys, [txid, repr(score)], what=f"move transaction record {txid!r}"
            )

    def now(self) -> float:
        with self._clock_mutex:
            clock = self._clock
        local = time.monotonic()
        if clock is not None and local - clock[1] < _CLOCK_REREAD:
            # Counted from when the reply *arrived*, the estimate is at or behind the
            # server's clock: a deadline set by it is never later than the server's own.
            return clock[0] + (local - clock[1])
        seconds, micros = self._backend.call(
            lambda: self._redis.time(),
            what="read the redis server clock",
            retry=True,
        )
        clock = (seconds + micros / 1e6, time.monotonic())
        with self._clock_mutex:
            self._clock = clock
        return clock[0]

    def durability(self) -> str | None:
        return persistence.log_problem(persistence.read(self._backend))


@dataclass(frozen=True)
class ZRange:
    """One ``ZRANGE key low high BYSCORE [REV] LIMIT offset count WITHSCORES``."""

    key: str
    low: str
    high: str
    desc: bool
    offset: int
    count: int

    def queue(self, pipe: Any) -> None:
        """Add it to ``pipe`` (a sync or an async redis-py pipeline)."""
        pipe.zrange(
            self.key, self.low, self.high, desc=self.desc, withscores=True, byscore=True,
            offset=self.offset, num=self.count,
        )  # fmt: skip


def past_cursor(
    keys: list[str], after: tuple[float, str] | None, limit: int, newest_first: bool
) -> Generator[list[ZRange], list[list[tuple[bytes, float]]], list[tuple[float, str]]]:
    """The first ``limit`` entries ``(score, member)`` of the indexes ``keys`` merged,
    strictly past ``after`` in the listing's order: a program yielding the ZRANGEs to run
    together (one pipeline) and sent their replies, so the sync and the async log read a
    page in the same steps.

    The score bound is inclusive (a zset orders equal scores by member, as the listing
    does): entries at the cursor's score but not past its txid are dropped, and an index
    whose run came up short because of them is read again further on. ``limit + 1``
    covers the usual case (the cursor's own entry) in the first round trip.
    """
    runs: dict[int, list[tuple[float, str]]] = {i: [] for i in range(len(keys))}
    offsets = dict.fromkeys(runs, 0)
    todo = list(runs)
    count = limit + 1
    if after is None:
        low, high = ("+inf", "-inf") if newest_first else ("-inf", "+inf")
    else:
        low, high = (repr(after[0]), "-inf") if newest_first else (repr(after[0]), "+inf")
    while todo:
        replies = yield [ZRange(keys[i], low, high, newest_first, offsets[i], count) for i in todo]
        again = []
        for i, reply in zip(todo, replies, strict=True):
            for member, score in reply:
                entry = (score, member.decode())
                if after is None or (entry < after if newest_first else entry > after):
                    runs[i].append(entry)
            offsets[i] += len(reply)
            if len(reply) == count and len(runs[i]) < limit:
                again.append(i)
        todo = again
    merged = heapq.merge(*(runs[i][:limit] for i in runs), reverse=newest_first)
    return list(itertools.islice(merged, limit))
