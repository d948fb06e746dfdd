"""Redis key layout: every multi-key step in one hash slot, the 2PC log's buckets, and the
move of transaction records written in the layout before the buckets.

These run on the shared redis server, so with DCOORD_TEST_TOPOLOGY=cluster (or
sentinel) they run on that topology unchanged.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import dcoord
from dcoord import txlog
from dcoord.backends.redis.migrate import migrate_legacy_keys
from dcoord.backends.redis.slots import BUCKETS, bucket, slot
from dcoord.participants import KVParticipant
from tests.conftest import SECURE, Servers

# Commands whose arguments hold more than one key, and where the keys are.
KEYS_FROM_NUMKEYS = {"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"}
ALL_ARGS_ARE_KEYS = {"MGET", "DEL", "UNLINK", "EXISTS", "TOUCH", "WATCH"}
# Commands with at most one key (or none: pub/sub channels are not keys). A command the
# library starts to send that is in neither set fails the test, to be classified here.
SINGLE_OR_NO_KEY = {
    "GET", "SET", "PTTL", "PEXPIRE", "INCR", "HSET", "HGET", "HDEL", "HMGET", "HGETALL",
    "ZADD", "ZREM", "ZRANGE", "ZRANGEBYSCORE", "ZCARD", "TIME", "INFO", "PING", "SCAN",
    "SCRIPT", "CLIENT", "SUBSCRIBE", "UNSUBSCRIBE", "PSUBSCRIBE", "PUNSUBSCRIBE",
    "SSUBSCRIBE", "SUNSUBSCRIBE", "PUBLISH", "SPUBLISH", "SELECT", "AUTH", "HELLO",
    "CLUSTER", "COMMAND", "READONLY", "WAIT", "SENTINEL", "ROLE", "CONFIG", "TYPE",
    "MULTI", "EXEC", "DISCARD",
}  # fmt: skip


def keys_of(args: tuple[Any, ...]) -> list[bytes]:
    """The keys in one command's arguments."""
    name = _text(args[0]).split()[0].upper()  # "CONFIG GET" is CONFIG's subcommand
    if name in KEYS_FROM_NUMKEYS:
        return [_bytes(a) for a in args[3 : 3 + int(args[2])]]
    if name in ALL_ARGS_ARE_KEYS:
        return [_bytes(a) for a in args[1:]]
    assert name in SINGLE_OR_NO_KEY, f"classify the command {name} in this test"
    return []


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class Recorder:
    """Every command any redis-py connection of this process sends while installed, one
    at a time or in a pipeline."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []
        self._mutex = threading.Lock()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        connection = redis.connection.AbstractConnection
        send_command, pack_command = connection.send_command, connection.pack_command
        pack_commands = connection.pack_commands

        def send(conn: Any, *args: Any, **kwargs: Any) -> Any:
            self._record(args)
            return send_command(conn, *args, **kwargs)

        def one(conn: Any, *args: Any) -> Any:
            self._record(args)
            return pack_command(conn, *args)

        def many(conn: Any, commands: Any) -> Any:
            commands = list(commands)
            for args in commands:
                self._record(tuple(args))
            return pack_commands(conn, commands)

        monkeypatch.setattr(connection, "send_command", send)
        monkeypatch.setattr(connection, "pack_command", one)
        monkeypatch.setattr(connection, "pack_commands", many)

    def _record(self, args: tuple[Any, ...]) -> None:
        with self._mutex:
            self.commands.append(args)

    def names(self) -> set[str]:
        with self._mutex:
            return {_text(args[0]).split()[0].upper() for args in self.commands}

    def cross_slot(self) -> list[str]:
        """The multi-key commands whose keys lie in more than one slot."""
        with self._mutex:
            commands = list(self.commands)
        found = []
        for args in commands:
            keys = keys_of(args)
            if len({slot(k.decode()) for k in keys}) > 1:
                found.append(f"{_text(args[0])} {[k.decode() for k in keys]}")
        return found


@pytest.fixture
def connect_redis(servers: Servers, namespace: str) -> Iterator[Callable[..., dcoord.Client]]:
    """``connect_redis(**options)``: a client of the shared redis server (or topology)."""
    url = servers.confined_url("redis", namespace)
    clients: list[dcoord.Client] = []

    def make(**options: Any) -> dcoord.Client:
        client = dcoord.connect(url, namespace=namespace, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


class Nothing:
    """A participant "p" that votes yes and has nothing to commit or abort."""

    name = "p"

    def prepare(self, txid: str, payload: Any) -> bool:
        return True

    def commit(self, txid: str) -> None:
        pass

    def abort(self, txid: str) -> None:
        pass


def coordinator(client: dcoord.Client, *parts: Any, **options: Any) -> dcoord.Coordinator:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcoord.DurabilityWarning)
        return client.coordinator(participants=parts, **options)


def test_every_script_and_multi_key_command_stays_in_one_slot(
    connect_redis: Callable[..., dcoord.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drive every primitive while recording each command sent: all keys of one
    script or multi-key command hash to one slot (what a Redis Cluster requires). The
    moves of the old layout (migrate.py, txlog_migrate.lua) are the one exception: they
    run only on one server, where the old layout was possible (tested below)."""
    recorder = Recorder()
    recorder.install(monkeypatch)
    a, b = connect_redis(), connect_redis()

    # Locks (contended: the waiter subscribes), fences, fenced writes, plain kv steps.
    held = a.lock("orders", ttl=10)
    assert held.acquire(timeout=5)
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(b.lock("orders").acquire(timeout=30)))
    waiter.start()
    held.extend(10)
    fence = a.fence("orders")
    assert fence.admit(held.fence)
    assert fence.write(held.fence, "{orders}balance", b"10")
    assert fence.highest() == held.fence
    held.release()
    waiter.join()
    assert got == [True]
    kv = a.backend.kv
    assert kv.apply({"{acct}x": b"1", "{acct}y": b"2"}, only_if={"{acct}x": None})
    assert kv.swap({}, ["{acct}y"], only_if={"{acct}x": b"2"}) == {"{acct}x": b"1"}
    assert kv.scan("{acct}") == {"{acct}x": b"1", "{acct}y": b"2"}

    # Semaphores, read-write locks, elections, membership and a live ring.
    permit = a.semaphore("pool", 2)
    assert permit.acquire(timeout=5)
    permit.release()
    writer = a.rwlock("doc").write()
    assert writer.acquire(timeout=5)
    writer.release()
    reader = a.rwlock("doc").read()
    assert reader.acquire(timeout=5)
    reader.release()
    lead = a.election("db").campaign("node-a", ttl=10, timeout=5)
    assert lead is not None
    lead.proclaim("node-a:1")
    assert b.election("db").leader() is not None
    lead.resign()
    member = a.group("cache").join("node-a", ttl=10)
    ring = b.group("cache").ring()
    assert "node-a" in b.group("cache").members()
    ring.close()
    member.leave()

    # Two-phase commit over two KVParticipants: commit, a no vote, recovery, listing.
    parts = (KVParticipant(a, "bank-a"), KVParticipant(a, "bank-b"))
    coord = coordinator(a, *parts)
    with coord.transaction() as tx:
        tx.enlist("bank-a", {"set": {"alice": 10, "carol": "text"}})
        tx.enlist("bank-b", {"set": {"bob": 5}, "delete": ["dave"]})
    with pytest.raises(dcoord.TransactionAborted), coord.transaction() as tx:
        tx.enlist("bank-a", {"add": {"carol": 1}})  # not a number: bank-a votes no
        tx.enlist("bank-b", {"add": {"bob": 1}})
    assert parts[0].items() == {"alice": 10, "carol": "text"}
    assert parts[0].in_doubt() == []
    assert coord.recover().clean
    assert len(coord.transactions()) == 2
    coord.close()

    assert {"EVALSHA", "MGET"} <= recorder.names(), recorder.names()
    assert recorder.cross_slot() == []


def test_the_recorder_catches_a_step_across_slots(
    connect_redis: Callable[..., dcoord.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: keys without a common tag, on one server, are reported."""
    recorder = Recorder()
    recorder.install(monkeypatch)
    client = connect_redis()
    if client.settings.topology == "cluster":
        pytest.skip("a Cluster refuses the step itself (see the test below)")
    assert client.backend.kv.apply({"x": b"1", "y": b"2"})
    assert client.fence("orders").write(1, "balance", b"1")
    assert len(recorder.cross_slot()) == 2


def test_steps_across_slots_are_refused_by_name_on_a_cluster(
    connect_redis: Callable[..., dcoord.Client],
) -> None:
    client = connect_redis()
    if client.settings.topology != "cluster":
        pytest.skip("only a Redis Cluster refuses keys in several slots")
    with pytest.raises(dcoord.ConfigError, match=r"'\{orders\}\.\.\.'.*balance"):
        client.fence("orders").write(1, "balance", b"1")
    with pytest.raises(dcoord.ConfigError, match="hash to 2 slots"):
        client.backend.kv.apply({"x": b"1", "y": b"2"})
    assert client.fence("orders").highest() is None  # nothing was written


def test_layout_of_the_log_participants_and_fences(
    connect_redis: Callable[..., dcoord.Client], namespace: str
) -> None:
    client = connect_redis()
    part = KVParticipant(client, "bank")
    coord = coordinator(client, part)
    with coord.transaction() as tx:
        tx.enlist("bank", {"set": {"alice": 1}})
    coord.close()
    assert client.fence("orders").admit(7)
    raw: Any = client.backend.redis
    keys = {k.decode() for k in raw.scan_iter(match=f"dcoord:{namespace}:*")}
    (record,) = [k for k in keys if ":r:" in k]
    txid = record.split(":r:", 1)[1]
    number = bucket(txid)
    assert record == f"dcoord:{namespace}:tx:{{{namespace}:tx:{number:02d}}}:r:{txid}"
    # The finished record left its bucket's index, in the same slot.
    index = f"dcoord:{namespace}:tx:{{{namespace}:tx:{number:02d}}}:open"
    assert slot(index) == slot(record)
    assert f"dcoord:{namespace}:kv:kvp/{{bank}}/d/alice" in keys
    assert f"dcoord:{namespace}:fence:{{orders}}" in keys
    assert part.items() == {"alice": 1}
    # The buckets land in as many different slots: they spread over a Cluster.
    log = client.backend.txlog
    assert len({slot(log.index_key(n)) for n in range(BUCKETS)}) == BUCKETS


def txids_in_every_bucket() -> list[str]:
    """One txid per bucket."""
    chosen: dict[int, str] = {}
    n = 0
    while len(chosen) < BUCKETS:
        chosen.setdefault(bucket(f"tx-{n}"), f"tx-{n}")
        n += 1
    return [chosen[b] for b in range(BUCKETS)]


def test_recover_and_listing_cover_every_bucket(
    connect_redis: Callable[..., dcoord.Client],
) -> None:
    """Undecided records in all sixteen buckets, left by a crashed coordinator: the
    listing merges the buckets by deadline, and recovery aborts every one."""
    client = connect_redis()
    log = client.backend.txlog
    now = log.now()
    txids = txids_in_every_bucket()
    # Deadlines in the reverse of bucket order, all passed: the merge must reorder.
    for i, txid in enumerate(txids):
        record = txlog.new_record(txid, {"p": None}, now=now - 100 - i, timeout=1)
        assert log.create(txid, txlog.encode(record), record.deadline) is not None
    earliest = [t for t, _ in log.unfinished(limit=3)]
    assert earliest == list(reversed(txids))[:3]
    assert [t for t, _ in log.unfinished()] == list(reversed(txids))
    coord = coordinator(client, Nothing())
    report = coord.recover()
    assert sorted(report.aborted) == sorted(txids)
    assert log.unfinished() == []
    assert {r.txid for r in coord.transactions()} == set(txids)
    coord.close()


def test_unfinished_records_of_the_old_layout_move_into_their_buckets(
    connect_redis: Callable[..., dcoord.Client], namespace: str
) -> None:
    """A deployment upgraded from the single-index layout: a decided record that a
    participant may be waiting on is found by get(), resolve() and recover(); one written
    later by a process of the old version is moved by the next listing."""
    old_client = connect_redis()
    if old_client.settings.topology == "cluster":
        pytest.skip("the old layout never ran on a Cluster (its steps span slots)")
    old: Any = old_client.backend.redis
    legacy_index = f"dcoord:{namespace}:tx:unfinished"

    def write_old(txid: str, state: str) -> None:
        record = txlog.new_record(txid, {"p": None}, now=1000.0, timeout=10)
        if state == "committing":
            record = txlog.decide(record, "committed", now=1001.0)
        old.set(f"dcoord:{namespace}:tx:r:{txid}", txlog.encode(record))
        old.zadd(legacy_index, {txid: record.deadline})

    write_old("old-commit", "committing")
    write_old("old-start", "started")
    client = connect_redis()  # a client of the new version, first use below
    coord = coordinator(client, Nothing())
    stored = coord.get("old-commit")
    assert stored is not None and stored.state is txlog.TxState.COMMITTING
    assert coord.resolve("old-commit") == "committed"
    # (GET and ZRANGE: the namespace ACL rule has no EXISTS)
    assert old.get(f"dcoord:{namespace}:tx:r:old-commit") is None
    assert old.zrange(legacy_index, 0, -1) == []
    write_old("old-late", "committing")  # an old-version process still running
    report = coord.recover()
    # The started one is past its deadline: aborted; all are in the new layout now.
    assert report.aborted == ["old-start"]
    assert sorted(report.committed) == ["old-commit", "old-late"]
    assert report.clean
    assert old.zrange(legacy_index, 0, -1) == []
    assert {r.txid for r in coord.transactions()} == {"old-commit", "old-start", "old-late"}
    coord.close()


def test_migrate_legacy_keys_moves_fences_and_participant_keys(
    connect_redis: Callable[..., dcoord.Client], namespace: str
) -> None:
    """The one-shot move of the old layout: fences keep their greatest token, a
    participant's values, staged writes and reservations work under the new names."""
    client = connect_redis()
    if client.settings.topology == "cluster":
        pytest.skip("the old layout never ran on a Cluster (its steps span slots)")
    raw: Any = client.backend.redis
    ns = f"dcoord:{namespace}"
    raw.set(f"{ns}:fence:orders", "500")
    raw.set(f"{ns}:fence:jobs", "800")
    raw.set(f"{ns}:fence:{{jobs}}", "900")  # admitted by the new version already: greater
    raw.set(f"{ns}:kv:kvp/bank/d/alice", b'{"f":1,"v":7}')
    raw.set(f"{ns}:kv:kvp/bank/s/tx-9", b'{"f":{"bob":1},"w":{"bob":3}}')
    raw.set(f"{ns}:kv:kvp/bank/o/bob", b"tx-9")
    raw.set(f"{ns}:kv:kvp/bank/d/carol", b'{"f":1,"v":"old"}')
    raw.set(f"{ns}:kv:kvp/{{bank}}/d/carol", b'{"f":2,"v":"new"}')
    moved = migrate_legacy_keys(client)
    assert moved == {"fences": 2, "participant_keys": 3, "conflicts": 1}
    assert client.fence("orders").highest() == 500
    assert client.fence("jobs").highest() == 900
    part = KVParticipant(client, "bank")
    assert part.get("alice") == 7 and part.get("carol") == "new"
    assert part.in_doubt() == ["tx-9"] and part.reserved() == {"bob": "tx-9"}
    part.commit("tx-9")
    assert part.get("bob") == 3 and part.reserved() == {}
    # Idempotent: only the conflict (left for an operator) is found again.
    assert migrate_legacy_keys(client) == {"fences": 0, "participant_keys": 0, "conflicts": 1}
    assert raw.get(f"{ns}:kv:kvp/bank/d/carol") == b'{"f":1,"v":"old"}'


def test_a_forced_write_follows_its_slot_to_another_primary(
    connect_redis: Callable[..., dcoord.Client],
) -> None:
    """With min_replicas, a forced write goes to the node redis-py's slot map names: when
    the slot moved meanwhile, the node answers MOVED, the map is reread and the write
    (and its WAIT) lands on the new owner."""
    client = connect_redis(min_replicas=1, replica_timeout=2.0)
    cluster: Any = client.backend.redis
    if client.settings.topology != "cluster" or SECURE:
        pytest.skip("needs a Redis Cluster and the admin's CLUSTER SETSLOT")
    log = client.backend.txlog

    def record(txid: str) -> bytes:
        return txlog.encode(txlog.new_record(txid, {"p": None}, now=log.now(), timeout=30))

    assert log.create("warm", record("warm"), 1e10) is not None  # the map is cached now
    key = log.record_key("moved")
    number = slot(key)
    source = cluster.get_node_from_key(key)
    target = next(n for n in cluster.get_primaries() if n.name != source.name)

    def node(n: Any) -> Any:
        return cluster.get_redis_connection(n)

    source_id = node(source).execute_command("CLUSTER MYID")
    target_id = node(target).execute_command("CLUSTER MYID")
    node(target).execute_command("CLUSTER SETSLOT", number, "IMPORTING", source_id)
    node(source).execute_command("CLUSTER SETSLOT", number, "MIGRATING", target_id)
    for moving in node(source).execute_command("CLUSTER GETKEYSINSLOT", number, 1000):
        node(source).execute_command("MIGRATE", target.host, target.port, moving, 0, 5000)
    for primary in cluster.get_primaries():
        node(primary).execute_command("CLUSTER SETSLOT", number, "NODE", target_id)
    rereads: list[int] = []
    reread = cluster.nodes_manager.initialize

    def counted(*args: Any, **kwargs: Any) -> Any:
        rereads.append(1)
        return reread(*args, **kwargs)

    cluster.nodes_manager.initialize = counted
    assert log.create("moved", record("moved"), 1e10) is not None
    assert rereads == [1]
    assert node(target).get(key) is not None
