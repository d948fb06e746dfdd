"""Fair locks (``client.lock(name, fair=True)``): arrival order on every backend, and
the queue's own guarantees (a waiter that gives up or dies leaves no entry behind)."""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import dcoord
import dcoord.backends.redis.locks
from dcoord.backends.memory.locks import _table
from dcoord.backends.redis.locks import (
    fair_keys,
    fair_token,
    grant_channel,
    lock_keys,
    milliseconds,
)
from tests.conformance.test_locks import MARGIN, TTL, stored_keys, wait_until
from tests.faults.child import DrivenChild

Connect = Callable[..., dcoord.Client]


def queued(client: dcoord.Client, name: str) -> int:
    """How many waiters (and, on etcd, the holder) queue on lock ``name``."""
    backend: object = client.backend
    kind = client.backend.kind
    if kind == "redis":
        # The waiters' expiries: one entry per queued token, as the queue list has. Read
        # with ZRANGE, which the documented ACL rule allows (LLEN it does not: the
        # confined users of DCOORD_TEST_SECURE run this too).
        _, waiters = fair_keys(lock_keys(backend.prefix, name)[0])  # type: ignore[attr-defined]
        return len(backend.redis.zrange(waiters, 0, -1))  # type: ignore[attr-defined]
    if kind == "etcd":
        return len([k for k in stored_keys(client) if "/lock/" in k])
    entry = _table(backend.server).entries.get(f"{backend.prefix}lock/{name}")  # type: ignore[attr-defined]
    return 0 if entry is None else len(entry.queue)


def test_fair_waiters_are_granted_in_arrival_order(connect: Connect, backend: str) -> None:
    clients = [connect() for _ in range(4)]
    holder = clients[0].lock("res", fair=True)
    assert holder.acquire()
    order: list[int] = []
    fences: list[int] = []
    threads = []
    # etcd counts the holder's key in its queue.
    already = 1 if backend == "etcd" else 0
    for i in (1, 2, 3):

        def wait(i: int = i) -> None:
            lock = clients[i].lock("res", ttl=30, fair=True)
            assert lock.acquire(timeout=20)
            order.append(i)
            assert lock.fence is not None
            fences.append(lock.fence)
            lock.release()

        threads.append(threading.Thread(target=wait))
        threads[-1].start()
        # The next waiter arrives only once this one has queued.
        assert wait_until(lambda i=i: queued(clients[0], "res") == already + i, 5)
    holder.release()
    for t in threads:
        t.join(timeout=20)
    assert order == [1, 2, 3]
    assert fences == sorted(fences) and len(set(fences)) == 3
    assert wait_until(lambda: queued(clients[0], "res") == 0, 5)


def test_fair_lock_excludes_and_fences_under_contention(connect: Connect) -> None:
    clients = [connect() for _ in range(3)]
    inside = 0
    overlaps = 0
    fences: list[int] = []
    guard = threading.Lock()

    def work(client: dcoord.Client) -> None:
        nonlocal inside, overlaps
        lock = client.lock("res", ttl=30, fair=True)
        for _ in range(15):
            with lock:
                with guard:
                    inside += 1
                    overlaps += inside > 1
                    assert lock.fence is not None
                    fences.append(lock.fence)
                time.sleep(0.001)  # a critical section others contend for
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work, args=(c,)) for c in clients for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert overlaps == 0
    assert len(fences) == 90 and fences == sorted(fences) and len(set(fences)) == 90
    assert wait_until(lambda: queued(clients[0], "res") == 0, 5)


def test_fair_waiter_that_gives_up_leaves_nothing(connect: Connect) -> None:
    a, b = connect(), connect()
    assert a.lock("res", fair=True).acquire()
    before = stored_keys(a)
    waiter = b.lock("res", timeout=0.4, fair=True)
    started = time.monotonic()
    assert waiter.acquire() is False
    assert 0.4 <= time.monotonic() - started < 0.4 + MARGIN
    assert waiter.acquire(blocking=False) is False
    # No queue entry left (Redis: no queue keys; etcd: the queue key is deleted).
    assert wait_until(lambda: stored_keys(a) == before, 2), (before, stored_keys(a))


def test_fair_waiter_gives_up_and_the_next_one_is_granted(connect: Connect) -> None:
    a, b, c = connect(), connect(), connect()
    holder = a.lock("res", ttl=30, fair=True)
    assert holder.acquire()
    quitter = b.lock("res", ttl=30, fair=True)
    gave_up = threading.Event()
    threading.Thread(
        target=lambda: (quitter.acquire(timeout=0.5), gave_up.set()), daemon=True
    ).start()
    already = 1 if a.backend.kind == "etcd" else 0
    assert wait_until(lambda: queued(a, "res") == already + 1, 5)
    got = threading.Event()
    late = c.lock("res", ttl=30, fair=True)
    threading.Thread(target=lambda: late.acquire(timeout=20) and got.set(), daemon=True).start()
    assert wait_until(lambda: queued(a, "res") == already + 2, 5)
    assert gave_up.wait(10)
    holder.release()
    # Behind a waiter that left, the next in line is woken at once (no TTL wait).
    assert got.wait(5)
    late.release()


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_dead_fair_waiter_leaves_the_queue_when_its_entry_expires(
    real_backend_url: str, namespace: str
) -> None:
    a = dcoord.connect(real_backend_url, namespace=namespace)
    b = dcoord.connect(real_backend_url, namespace=namespace)
    try:
        holder = a.lock("res", ttl=30, fair=True)
        assert holder.acquire()
        # A waiter that queues once and dies: it never calls again.
        dead = b.backend.locks.slot("res", TTL["redis"], True, True)  # type: ignore[call-arg]
        assert dead._try("dead-waiter")[0] < 0  # type: ignore[attr-defined]
        assert queued(a, "res") == 1
        holder.release()
        late = a.lock("res", ttl=30, fair=True)
        # Negative control: while its entry lives, the dead waiter keeps its turn.
        assert late.acquire(blocking=False) is False
        started = time.monotonic()
        assert late.acquire(timeout=10)
        assert time.monotonic() - started < TTL["redis"] + MARGIN
        late.release()
        assert wait_until(lambda: stored_keys(a) == [k for k in stored_keys(a) if "fence" in k], 2)
    finally:
        a.close()
        b.close()


def test_fair_option_is_checked(client: dcoord.Client) -> None:
    with pytest.raises(dcoord.ConfigError, match="fair must be True or False, got 'yes'"):
        client.lock("res", fair="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("real_backend", ["etcd"], indirect=True)
def test_etcd_waiter_watches_before_it_reads_never_from_a_past_revision(
    real_backend_url: str, namespace: str
) -> None:
    """A watch from a past revision is served by etcd's catch-up loop (every 100 ms);
    the waiter watches first, from now, and then reads its place."""
    a = dcoord.connect(real_backend_url, namespace=namespace)
    b = dcoord.connect(real_backend_url, namespace=namespace)
    try:
        etcd = b.backend.etcd  # type: ignore[attr-defined]
        watches: list[dict[str, object]] = []
        real_watch = etcd.add_watch_callback

        def watch(*args: object, **kwargs: object) -> object:
            watches.append(kwargs)
            return real_watch(*args, **kwargs)

        etcd.add_watch_callback = watch
        holder = a.lock("res", ttl=30)
        assert holder.acquire()
        got = threading.Event()
        waiter = b.lock("res", ttl=30)
        threading.Thread(target=lambda: waiter.acquire(timeout=20) and got.set()).start()
        assert wait_until(lambda: bool(watches), 5)
        holder.release()
        assert got.wait(10)
        waiter.release()
        assert watches and all(w.get("start_revision") is None for w in watches), watches
    finally:
        a.close()
        b.close()


class Interrupted(Exception):
    """Stands for an interrupt (KeyboardInterrupt, a signal handler's exception)."""


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_fair_waiter_interrupted_while_waiting_leaves_the_queue(
    real_backend_url: str, namespace: str
) -> None:
    a = dcoord.connect(real_backend_url, namespace=namespace)
    b = dcoord.connect(real_backend_url, namespace=namespace)
    try:
        assert a.lock("res", ttl=30, fair=True).acquire()
        before = stored_keys(a)
        notifier = b.backend.locks.notifier  # type: ignore[attr-defined]

        def interrupt(*args: object) -> None:
            raise Interrupted

        notifier.wait = interrupt
        with pytest.raises(Interrupted):
            b.lock("res", ttl=30, fair=True).acquire(timeout=20)
        # It had queued (its first attempt found the lock held); the cleanup takes it
        # out at once, not after its entry's 5 s.
        assert wait_until(lambda: stored_keys(a) == before, 2), (before, stored_keys(a))
    finally:
        a.close()
        b.close()


# -- Redis: the release hands the lock to the queue's head ------------------------------


def fair_state(client: dcoord.Client, name: str) -> tuple[bytes | None, int]:
    """The token holding Redis lock ``name`` and its fence counter."""
    backend: Any = client.backend
    key, fence, _ = lock_keys(backend.prefix, name)
    holder, counter = backend.redis.mget([key, fence])
    return holder, int(counter or 0)


@contextlib.contextmanager
def listening(backend: Any, channel: str) -> Iterator[Callable[[], list[bytes]]]:
    """Subscribe to ``channel`` (a shard channel on a Cluster, as the scripts publish
    there); gives a function that reads what has come so far and returns it all."""
    sharded = backend.settings.topology == "cluster"
    pubsub = backend.redis.pubsub()
    messages: list[bytes] = []

    def heard() -> list[bytes]:
        read = pubsub.get_sharded_message if sharded else pubsub.get_message
        while (message := read(timeout=0.05)) is not None:
            if message["type"] in ("message", "smessage"):
                messages.append(message["data"])
        return messages

    try:
        (pubsub.ssubscribe if sharded else pubsub.subscribe)(channel)
        yield heard
    finally:
        pubsub.close()


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_fair_release_hands_the_lock_over_without_an_acquire_of_the_waiter(
    real_backend_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiter learns its grant and fence from the release's message: no try of its
    own after the release (its entry lives a minute, so it has no reason to call)."""
    monkeypatch.setattr(dcoord.backends.redis.locks, "FAIR_WAITER_TTL", 60.0)
    a = dcoord.connect(real_backend_url, namespace=namespace)
    b = dcoord.connect(real_backend_url, namespace=namespace)
    try:
        holder = a.lock("res", ttl=30, fair=True)
        assert holder.acquire()
        first = holder.fence
        waiter = b.lock("res", ttl=30, fair=True)
        slot: Any = waiter._slot  # type: ignore[attr-defined]
        tries: list[float] = []
        real_try = slot._try

        def counted(*args: Any, **kwargs: Any) -> Any:
            tries.append(time.monotonic())
            return real_try(*args, **kwargs)

        slot._try = counted
        notifier: Any = b.backend.locks.notifier  # type: ignore[attr-defined]
        real_wait = notifier.wait
        seen: list[int] = []  # the channel's generation before each try that went to sleep

        def wait(channel: Any, generation: int, *args: Any) -> None:
            seen.append(generation)
            real_wait(channel, generation, *args)

        notifier.wait = wait
        got = threading.Event()
        threading.Thread(target=lambda: waiter.acquire(timeout=20) and got.set()).start()
        # Asleep after a try that followed the subscription's confirmation (which wakes
        # waiters for one more try): nothing but the release wakes it now.
        assert wait_until(lambda: bool(seen) and seen[-1] >= 1, 10)
        before = len(tries)
        # The grant goes to the waiter's client alone, on its own channel.
        grants = grant_channel(slot.channel, b.backend.locks.tag)  # type: ignore[attr-defined]
        with listening(a.backend, grants) as heard:
            holder.release()
            assert got.wait(10)
            assert len(tries) == before  # granted by the release alone
            assert waiter.fence is not None and first is not None and waiter.fence > first
            token, counter = fair_state(a, "res")
            assert token is not None and token.decode() == slot._token
            assert wait_until(lambda: bool(heard()), 5)
            assert heard() == [f"granted:{waiter.fence}:".encode() + token]
        assert counter == waiter.fence and waiter.held
        waiter.release()
        assert queued(a, "res") == 0
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_fair_grant_handed_to_a_waiter_that_gave_up_is_released_and_passed_on(
    real_backend_url: str, namespace: str
) -> None:
    """A waiter whose time ran out as the release handed it the lock leaves the queue
    with the cancel script, which lets go of the grant and hands it to the next waiter:
    nothing is held until the quitter's TTL. Each grant's fence is above the last."""
    a = dcoord.connect(real_backend_url, namespace=namespace)
    b = dcoord.connect(real_backend_url, namespace=namespace)
    try:
        holder = a.lock("res", ttl=30, fair=True)
        assert holder.acquire()
        # The quitter queues (one try, as a waiting acquire makes), then stops listening.
        quitter: Any = b.backend.locks.slot("res", 30.0, True, True)  # type: ignore[attr-defined]
        token = fair_token(milliseconds(30.0), "0b", "|quitter|")
        assert quitter._try(token)[0] < 0
        got = threading.Event()
        late = a.lock("res", ttl=30, fair=True)
        threading.Thread(target=lambda: late.acquire(timeout=20) and got.set()).start()
        assert wait_until(lambda: queued(a, "res") == 2, 5)
        holder.release()
        handed, handed_fence = fair_state(a, "res")
        assert handed == token.encode()  # the quitter holds it now, unaware
        assert holder.fence is not None and handed_fence > holder.fence
        # An attempt of the quitter now (one in flight as the release ran) finds the
        # lock handed to it: it gets the grant's fence and does not queue again; with
        # the counter lost meanwhile, a new fence above the old ones (not a crash).
        assert quitter._try(token)[0] == handed_fence
        backend: Any = a.backend
        backend.redis.delete(lock_keys(backend.prefix, "res")[1])
        refenced = quitter._try(token)[0]
        assert refenced > handed_fence and fair_state(a, "res")[1] == refenced
        assert queued(a, "res") == 1  # only the late waiter
        quitter._leave(token)  # as acquire() does when its deadline has passed
        assert got.wait(5)  # at once, not after the quitter's 30 s TTL
        assert late.fence is not None and late.fence > refenced
        late.release()
        assert queued(a, "res") == 0
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_fair_release_skips_a_dead_waiter(real_backend_url: str, namespace: str) -> None:
    """A waiter whose entry expired (it died while queued) is dropped, and the lock goes
    to the live one behind it; the dead one never holds it."""
    a = dcoord.connect(real_backend_url, namespace=namespace)
    b = dcoord.connect(real_backend_url, namespace=namespace)
    try:
        holder = a.lock("res", ttl=30, fair=True)
        assert holder.acquire()
        # Queues once with an entry of TTL["redis"], then never calls again.
        dead: Any = b.backend.locks.slot("res", TTL["redis"], True, True)  # type: ignore[attr-defined]
        dead_token = fair_token(milliseconds(TTL["redis"]), "0d", "|dead|")
        assert dead._try(dead_token)[0] < 0
        got = threading.Event()
        late = a.lock("res", ttl=30, fair=True)
        threading.Thread(target=lambda: late.acquire(timeout=20) and got.set()).start()
        assert wait_until(lambda: queued(a, "res") == 2, 5)
        backend: Any = a.backend
        _, waiters = fair_keys(lock_keys(backend.prefix, "res")[0])
        expires = backend.redis.zscore(waiters, dead_token)

        def server_ms() -> float:
            seconds, micros = backend.redis.time()
            return float(seconds * 1000 + micros // 1000)

        assert wait_until(lambda: server_ms() > expires, 5)
        holder.release()
        assert got.wait(5)
        token, _ = fair_state(a, "res")
        assert token is not None and token.decode() == late._slot._token  # type: ignore[attr-defined]
        late.release()
        assert queued(a, "res") == 0
    finally:
        a.close()
        b.close()


ROOT = Path(__file__).resolve().parents[2]
# A fair waiter (TTL 30 s, auto-renewed) in a process of its own, of the API its last
# argument names ("sync" or "aio"): the test kills it while it waits in the queue.
QUEUED_WAITER = """
import asyncio, sys
import dcoord, dcoord.aio
url, namespace, api = sys.argv[1:]
print("STARTED", flush=True)
if api == "sync":
    dcoord.connect(url, namespace=namespace).lock("res", ttl=30, fair=True).acquire(timeout=60)
else:
    async def wait():
        async with dcoord.aio.connect(url, namespace=namespace) as client:
            await client.lock("res", ttl=30, fair=True).acquire(timeout=60)
    asyncio.run(wait())
"""


def wait_behind_a_handed_dead_waiter(url: str, namespace: str, api: str) -> float:
    """How long (s) a waiter waits after the release that hands the lock to the waiter
    queued before it, which was killed (SIGKILL: no cancel, its entry still lives): a
    process waiting with ``api`` ("sync" or "aio"). Fails if it is not granted in 10 s."""
    argv = [sys.executable, "-c", QUEUED_WAITER, url, namespace, api]
    a = dcoord.connect(url, namespace=namespace)
    child = DrivenChild(argv, cwd=ROOT, kind="waiter")
    try:
        holder = a.lock("res", ttl=30, fair=True)
        assert holder.acquire()
        child.expect("STARTED")
        assert wait_until(lambda: queued(a, "res") == 1, 30)
        backend: Any = a.backend
        _, waiters = fair_keys(lock_keys(backend.prefix, "res")[0])
        (dead,) = backend.redis.zrange(waiters, 0, -1)
        late = a.lock("res", ttl=30, fair=True)
        granted: list[float] = []
        got = threading.Event()

        def wait() -> None:
            if late.acquire(timeout=40):
                granted.append(time.monotonic())
                got.set()

        threading.Thread(target=wait, daemon=True).start()
        assert wait_until(lambda: queued(a, "res") == 2, 10)
        child.signal(signal.SIGKILL)
        child.proc.wait(10)
        released = time.monotonic()
        holder.release()
        # The case in question: the dead waiter's entry still lived, so it got the lock.
        assert fair_state(a, "res")[0] == dead
        assert got.wait(10), "the next waiter waits out the dead waiter's TTL"
        late.release()
        assert queued(a, "res") == 0
        return granted[0] - released
    finally:
        child.stop()
        a.close()


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_fair_waiter_killed_while_queued_blocks_the_next_for_its_entry_life_only(
    real_backend_url: str, namespace: str
) -> None:
    """A release hands a waiter the lock only provisionally, for its queue entry's life
    (5 s): one that died while queued holds up the waiter behind it that long, as its
    entry did, not for its TTL (30 s)."""
    waited = wait_behind_a_handed_dead_waiter(real_backend_url, namespace, "sync")
    assert waited < 10


def pttl(client: dcoord.Client, name: str) -> int:
    """The server's remaining TTL (ms) of Redis lock ``name``."""
    backend: Any = client.backend
    return int(backend.redis.pttl(lock_keys(backend.prefix, name)[0]))


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_fair_waiter_handed_the_lock_renews_its_provisional_grant_to_its_ttl(
    connect: Connect,
) -> None:
    """A waiter handed the lock for its entry's life (5 s of its 30 s TTL) keeps it: its
    first renewal, before the 5 s run out, extends the lock to its TTL."""
    a, b = connect(), connect()
    holder = a.lock("res", ttl=30, fair=True)
    assert holder.acquire()
    lost: list[object] = []
    waiter = b.lock("res", ttl=30, fair=True, on_lost=lost.append)
    got = threading.Event()
    threading.Thread(target=lambda: waiter.acquire(timeout=20) and got.set(), daemon=True).start()
    assert wait_until(lambda: queued(a, "res") == 1, 10)
    holder.release()
    assert got.wait(10)
    granted = time.monotonic()
    token, _ = fair_state(a, "res")
    assert token is not None and b"~5000~" in token  # handed for 5 s
    assert wait_until(lambda: pttl(a, "res") > 5000, 10)  # renewed to the TTL
    # Past the provisional deadline (5 s after the grant at the latest), never lost.
    wait_until(lambda: bool(lost) or time.monotonic() > granted + 6, 10)
    assert not lost and waiter.held and fair_state(a, "res")[0] == token
    waiter.release()


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_fair_waiter_without_auto_renew_is_called_and_acquires_for_its_ttl(
    connect: Connect,
) -> None:
    """Nobody would extend a provisional grant of a waiter that does not auto-renew: its
    token asks for none, so the release calls it (``next:<token>``) and it acquires the
    lock itself, for its TTL, as an older client's waiter does."""
    a, b = connect(), connect()
    holder = a.lock("res", ttl=30, fair=True)
    assert holder.acquire()
    waiter = b.lock("res", ttl=30, fair=True, auto_renew=False)
    got = threading.Event()
    threading.Thread(target=lambda: waiter.acquire(timeout=20) and got.set(), daemon=True).start()
    assert wait_until(lambda: queued(a, "res") == 1, 10)
    backend: Any = a.backend
    key, _, channel = lock_keys(backend.prefix, "res")
    (token,) = backend.redis.zrange(fair_keys(key)[1], 0, -1)
    assert re.fullmatch(rb"[0-9a-f]+", token.split(b"|")[0])  # no hand-over asked for
    with listening(backend, channel) as heard:
        holder.release()
        assert got.wait(10)
        assert wait_until(lambda: bool(heard()), 5)
        assert heard() == [b"next:" + token]
    assert pttl(a, "res") > 5000  # its own acquire: the TTL, not an entry's life
    assert fair_state(a, "res")[0] == token
    assert waiter.fence is not None and holder.fence is not None and waiter.fence > holder.fence
    waiter.release()
    assert queued(a, "res") == 0


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_fair_queue_mixes_waiters_of_older_clients(
    real_backend_url: str, namespace: str
) -> None:
    """An older client's waiter (a token without its TTL) is called and acquires itself,
    and a waiter of this version called the older way (an older client's release
    publishes ``next:<token>`` and deletes the key) acquires when called."""
    a = dcoord.connect(real_backend_url, namespace=namespace)
    b = dcoord.connect(real_backend_url, namespace=namespace)
    try:
        backend: Any = a.backend
        key, _, channel = lock_keys(backend.prefix, "res")
        holder = a.lock("res", ttl=30, fair=True)
        assert holder.acquire()
        older: Any = b.backend.locks.slot("res", 30.0, True, True)  # type: ignore[attr-defined]
        old_token = "0123456789abcdef0123456789abcdef|older|"
        assert older._try(old_token)[0] < 0
        got = threading.Event()
        late = a.lock("res", ttl=30, fair=True)
        threading.Thread(target=lambda: late.acquire(timeout=20) and got.set()).start()
        assert wait_until(lambda: queued(a, "res") == 2, 5)
        with listening(backend, channel) as heard:
            holder.release()
            assert wait_until(lambda: bool(heard()), 5)
            messages = heard()
        assert messages == [b"next:" + old_token.encode()]
        assert fair_state(a, "res")[0] is None  # called, not handed the lock
        fence, _ = older._try(old_token)
        assert fence > 0
        # An older client's release: the call first, then the delete.
        head = backend.redis.lindex(fair_keys(key)[0], 0)
        assert head is not None and b"~5000~" in head  # the waiter of this version
        backend.redis.delete(key)
        sharded = backend.settings.topology == "cluster"
        (backend.redis.spublish if sharded else backend.redis.publish)(channel, b"next:" + head)
        assert got.wait(5)
        assert late.fence is not None and late.fence > fence
        late.release()
        assert queued(a, "res") == 0
    finally:
        a.close()
        b.close()
