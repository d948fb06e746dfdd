"""Leader election: the same assertions on every backend (memory, Redis, etcd)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import pytest

import dcoord
from dcoord.backends.memory.election import MemoryElections
from dcoord.backends.redis.election import RedisElections
from dcoord.election import Leader, Leadership
from tests.conformance.test_locks import wait_until

# Short TTLs keep the suite fast; etcd's minimum lease is about 2 s.
TTL = {"memory": 0.5, "redis": 0.5, "etcd": 2.0}
# Slack for thread wake-ups and round trips on a loaded 2-core machine.
MARGIN = 1.0

Connect = Callable[..., dcoord.Client]


def election_keys(client: dcoord.Client) -> list[str]:
    """Every election key of the client's namespace on the server (memory: live leaders),
    but Redis's term counters, which stay like lock fence counters."""
    backend: object = client.backend
    if client.backend.kind == "redis":
        pattern = backend.prefix + "election:*"  # type: ignore[attr-defined]
        keys = backend.redis.scan_iter(match=pattern)  # type: ignore[attr-defined]
        return sorted(k.decode() for k in keys if not k.endswith(b":term"))
    if client.backend.kind == "etcd":
        pairs = backend.etcd.get_prefix(backend.prefix + "election/")  # type: ignore[attr-defined]
        return sorted(meta.key.decode() for _, meta in pairs)
    store = client.backend.elections
    assert isinstance(store, MemoryElections)
    now = time.monotonic()
    return sorted(k for k, e in store._table.elections.items() if not e.vacant(now))


def sabotage(client: dcoord.Client, leadership: Leadership) -> None:
    """Make the server forget ``leadership`` behind its back (an operator, a lost lease)."""
    store = client.backend.elections
    if isinstance(store, MemoryElections):
        with store._table.cond:
            store._table.elections[store._key(leadership.election.name)].token = None
    elif isinstance(store, RedisElections):
        client.backend.redis.delete(store.keys(leadership.election.name)[0])  # type: ignore[attr-defined]
    else:
        lease = leadership._slot._lease  # type: ignore[attr-defined]
        client.backend.etcd.revoke_lease(lease.id)  # type: ignore[attr-defined]


def test_campaign_leader_proclaim_resign(connect: Connect, backend: str) -> None:
    a, b = connect(), connect()
    election = a.election("db")
    assert election.leader() is None
    lead = election.campaign("node-a", ttl=TTL[backend] * 4)
    assert lead is not None and lead.held and lead.value == "node-a"
    assert b.election("db").leader() == Leader(lead.term, b"node-a")
    assert b.election("db").campaign("node-b", timeout=0) is None
    lead.proclaim("node-a:5432")
    seen = b.election("db").leader()
    assert seen is not None and seen.term == lead.term and seen.value == "node-a:5432"
    assert lead.resign() is True
    assert not lead.held
    assert b.election("db").leader() is None
    assert lead.resign() is False  # idempotent
    # The next candidate is elected at once, not after the old leader's TTL.
    started = time.monotonic()
    other = b.election("db").campaign(b"node-b", ttl=TTL[backend] * 4, timeout=30)
    assert other is not None and other.term > lead.term
    assert time.monotonic() - started < TTL[backend] * 4
    with pytest.raises(dcoord.LockNotOwned, match="resigned"):
        lead.proclaim("again")
    assert a.election("db").leader() == Leader(other.term, b"node-b")
    other.resign()


def test_one_leader_at_a_time_and_terms_increase(connect: Connect, backend: str) -> None:
    clients = [connect(), connect()]
    inside = 0
    overlaps = 0
    terms: list[int] = []
    mutex = threading.Lock()

    def candidate(client: dcoord.Client, n: int) -> None:
        nonlocal inside, overlaps
        election = client.election("leader")
        for _ in range(4):
            lead = election.campaign(f"c{n}", ttl=TTL[backend] * 4, timeout=60)
            assert lead is not None
            with lead:
                with mutex:
                    inside += 1
                    overlaps += inside > 1
                    terms.append(lead.term)
                time.sleep(0.002)
                with mutex:
                    inside -= 1

    threads = [threading.Thread(target=candidate, args=(clients[i % 2], i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert overlaps == 0
    assert len(terms) == 16
    assert terms == sorted(terms) and len(set(terms)) == len(terms)
    assert election_keys(clients[0]) == []


def test_silent_leader_expires_and_next_term_is_greater(connect: Connect, backend: str) -> None:
    silent, other = connect(), connect()
    ttl = TTL[backend]
    old = silent.election("job").campaign("silent", ttl=ttl)
    assert old is not None
    # Stop the silent client's renewals (and etcd lease keep-alives) as a pause would.
    silent.scheduler.close()
    started = time.monotonic()
    new = other.election("job").campaign("other", ttl=ttl * 4, timeout=ttl * 4 + MARGIN * 4)
    elapsed = time.monotonic() - started
    assert new is not None, "a silent leader was never replaced"
    assert new.term > old.term
    assert not old.held
    # Not replaced long before the TTL (etcd rounds up and adds a keep-alive period).
    assert elapsed >= ttl * 0.5
    assert other.election("job").leader() == Leader(new.term, b"other")
    new.resign()


def test_on_lost_when_the_server_forgets_the_leader(connect: Connect, backend: str) -> None:
    client, rival = connect(), connect()
    lost: list[Leadership] = []
    called = threading.Event()

    def on_lost(leadership: Leadership) -> None:
        lost.append(leadership)
        called.set()

    lead = client.election("x").campaign("me", ttl=TTL[backend], on_lost=on_lost)
    assert lead is not None
    sabotage(client, lead)
    assert called.wait(TTL[backend] * 2 + MARGIN * 2), "on_lost was not called"
    assert lost == [lead] and not lead.held
    with pytest.raises(dcoord.LockNotOwned, match="not held"):
        lead.proclaim("still me?")
    successor = rival.election("x").campaign("rival", ttl=TTL[backend] * 4, timeout=10)
    assert successor is not None and successor.term > lead.term
    # The lost leader's resign deletes nothing of its successor's.
    assert lead.resign() is False
    assert rival.election("x").leader() == Leader(successor.term, b"rival")
    successor.resign()


def test_timeouts_leave_nothing_behind(connect: Connect, backend: str) -> None:
    a, b = connect(), connect()
    lead = a.election("t").campaign("a", ttl=TTL[backend] * 8)
    assert lead is not None
    assert b.election("t").campaign("b", timeout=0) is None
    started = time.monotonic()
    assert b.election("t").campaign("b", timeout=0.3) is None
    assert 0.3 <= time.monotonic() - started < 0.3 + MARGIN * 3
    lead.resign()
    # A timed-out candidate must not have stayed in line (etcd: its key is deleted).
    assert b.election("t").leader() is None
    assert election_keys(a) == []


def test_watch_delivers_every_change(connect: Connect, backend: str) -> None:
    a, b, watcher = connect(), connect(), connect()
    events: queue.Queue[Leader | None] = queue.Queue()
    watch = watcher.election("w").watch(events.put)
    wait = TTL[backend] * 4 + MARGIN * 4

    def next_event() -> Leader | None:
        return events.get(timeout=wait)

    assert next_event() is None  # the state at the start
    first = a.election("w").campaign("a", ttl=TTL[backend] * 4)
    assert first is not None
    assert next_event() == Leader(first.term, b"a")
    first.proclaim("a2")
    assert next_event() == Leader(first.term, b"a2")
    first.resign()
    assert next_event() is None
    second = b.election("w").campaign("b", ttl=TTL[backend])
    assert second is not None
    assert next_event() == Leader(second.term, b"b")
    # A leader that goes silent is reported gone within its TTL (no notification comes).
    b.scheduler.close()
    assert next_event() is None
    watch.stop()
    assert events.empty()


def test_context_manager_resigns_and_reports_loss(connect: Connect, backend: str) -> None:
    client = connect()
    election = client.election("cm")
    lead = election.campaign("v", ttl=TTL[backend] * 4)
    assert lead is not None
    with lead as inside:
        assert inside is lead and lead.held
    assert election.leader() is None and not lead.held
    lead = election.campaign("v", ttl=TTL[backend])
    assert lead is not None
    with pytest.raises(dcoord.LockLost, match="was lost while the with-block ran"), lead:
        sabotage(client, lead)
        assert wait_until(lambda: not lead.held, TTL[backend] * 2 + MARGIN * 2)


def test_term_fences_a_stale_leader(connect: Connect, backend: str) -> None:
    a, b = connect(), connect()
    old = a.election("f").campaign("a", ttl=TTL[backend])
    assert old is not None
    fence = a.fence("table")
    assert fence.admit(old.term)
    a.scheduler.close()  # the old leader pauses past its TTL
    new = b.election("f").campaign("b", ttl=TTL[backend] * 4, timeout=TTL[backend] * 4 + 10)
    assert new is not None
    assert b.fence("table").admit(new.term)
    assert not fence.admit(old.term)  # the stale leader's write is refused
    new.resign()


@pytest.mark.parametrize(
    ("call", "bad"),
    [
        (lambda e: e.campaign("v", ttl=0), "0"),
        (lambda e: e.campaign("v", ttl=float("nan")), "nan"),
        (lambda e: e.campaign("v", timeout=-1), "-1"),
        (lambda e: e.campaign(123), "123"),
        (lambda e: e.campaign("x" * 70_000), "70000 bytes"),
        (lambda e: e.campaign("v", on_lost="nope"), "'nope'"),
        (lambda e: e.watch(42), "42"),
    ],
)
def test_bad_input_names_the_value_and_writes_nothing(
    client: dcoord.Client, call: Callable[[dcoord.election.Election], object], bad: str
) -> None:
    with pytest.raises(dcoord.ConfigError, match=bad):
        call(client.election("bad"))
    assert client.election("bad").leader() is None
    assert election_keys(client) == []


@pytest.mark.parametrize("name", ["", "x" * 2000, "a\x00b", 7])
def test_bad_election_name(client: dcoord.Client, name: object) -> None:
    with pytest.raises(dcoord.ConfigError, match="election name"):
        client.election(name)  # type: ignore[arg-type]


def test_names_are_separate(connect: Connect, backend: str) -> None:
    client = connect()
    a = client.election("a").campaign("1", ttl=TTL[backend] * 4)
    ab = client.election("a/b").campaign("2", ttl=TTL[backend] * 4, timeout=0)
    assert a is not None and ab is not None, "election a/b waited for election a"
    a.resign()
    ab.resign()


def test_closed_client(connect: Connect) -> None:
    client = connect()
    election = client.election("c")
    client.close()
    with pytest.raises(dcoord.ClientClosed):
        election.campaign("v")
    with pytest.raises(dcoord.ClientClosed):
        client.election("c")


def test_etcdctl_elect_shares_the_election(backend: str, connect: Connect) -> None:
    """``etcdctl elect -l`` observes dcoord's leader, and an etcdctl candidate queues
    behind it and is elected when dcoord resigns (the layout is etcd's own recipe)."""
    import shutil
    import subprocess

    if backend != "etcd" or shutil.which("etcdctl") is None:
        pytest.skip("etcd only, with etcdctl installed")
    client = connect()
    endpoint = client.backend.endpoint  # type: ignore[attr-defined]
    prefix = f"/dcoord/{client.namespace}/election/a%2Fb"
    lead = client.election("a/b").campaign("dcoord-leader", ttl=10)
    assert lead is not None
    base = ["etcdctl", f"--endpoints={endpoint}", "elect"]
    observer = subprocess.Popen([*base, "-l", prefix], stdout=subprocess.PIPE, text=True)
    rival = subprocess.Popen([*base, prefix, "etcdctl-leader"], stdout=subprocess.PIPE, text=True)
    try:
        assert observer.stdout is not None and rival.stdout is not None
        assert observer.stdout.readline().startswith(prefix + "/")
        assert observer.stdout.readline().strip() == "dcoord-leader"
        assert wait_until(lambda: len(election_keys(client)) == 2, 10)  # etcdctl queued
        assert client.election("a/b").leader() == Leader(lead.term, b"dcoord-leader")
        assert lead.resign()
        assert rival.stdout.readline().startswith(prefix + "/")  # etcdctl elected
        leader = client.election("a/b").leader()
        assert leader is not None and leader.value == "etcdctl-leader"
        assert leader.term > lead.term
    finally:
        for proc in (observer, rival):
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def test_close_resigns_and_stops_watches_with_one_hook(connect: Connect, backend: str) -> None:
    closing, other = connect(), connect()
    hooks = len(closing._closers)
    handles = [closing.election(f"e{n}") for n in range(50)]
    assert len(closing._closers) == hooks + 1  # one hook per client, not per handle
    lead = handles[0].campaign("v", ttl=TTL[backend] * 8)
    assert lead is not None
    seen: list[Leader | None] = []
    handles[0].watch(seen.append)
    closing.close()
    # Resigned at close, not left to the TTL; the watch thread is gone.
    assert other.election("e0").leader() is None
    assert not lead.held
    assert not [t for t in threading.enumerate() if "election watch" in t.name]


def test_etcd_candidate_whose_key_vanished_while_waiting_queues_again(
    backend: str, connect: Connect
) -> None:
    """Go's Campaign reports leadership on a key that is gone; ours re-reads its key after
    every wait, queues again, and its term is that of the key that really leads."""
    if backend != "etcd":
        pytest.skip("etcd only: candidates have keys of their own there")
    a, b = connect(), connect()
    first = a.election("q").campaign("a", ttl=10)
    assert first is not None
    won: list[Leadership | None] = []
    waiter = threading.Thread(target=lambda: won.append(b.election("q").campaign("b", ttl=10)))
    waiter.start()
    assert wait_until(lambda: len(election_keys(a)) == 2, 10)
    leading_key = first._slot._key.decode()  # type: ignore[attr-defined]
    (queued,) = [k for k in election_keys(a) if k != leading_key]
    a.backend.etcd.delete(queued)  # type: ignore[attr-defined]
    assert first.resign()
    waiter.join(30)
    (second,) = won
    assert second is not None
    leader = a.election("q").leader()
    assert leader == Leader(second.term, b"b"), "reported a term that is not the leader key's"
    assert second.term > first.term
    second.resign()
