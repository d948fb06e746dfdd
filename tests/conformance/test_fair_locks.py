"""Fair locks (``client.lock(name, fair=True)``): arrival order on every backend, and
the queue's own guarantees (a waiter that gives up or dies leaves no entry behind)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

import dcoord
from dcoord.backends.memory.locks import _table
from dcoord.backends.redis.locks import fair_keys, lock_keys
from tests.conformance.test_locks import MARGIN, TTL, stored_keys, wait_until

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
