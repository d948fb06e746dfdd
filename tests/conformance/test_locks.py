"""Locks and fences: the same assertions on every backend (memory, Redis, etcd)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

import dcoord
from dcoord.backends.memory.locks import _table

# Short TTLs keep the suite fast; etcd's minimum lease is about 2 s.
TTL = {"memory": 0.5, "redis": 0.5, "etcd": 2.0}
# Slack for thread wake-ups and round trips on a loaded 2-core machine.
MARGIN = 0.5

Connect = Callable[..., dcoord.Client]


def stored_keys(client: dcoord.Client) -> list[str]:
    """Every key the client's namespace holds on the server (locks, fences, anything)."""
    backend: object = client.backend
    kind = client.backend.kind
    if kind == "redis":
        prefix = backend.prefix  # type: ignore[attr-defined]
        return sorted(k.decode() for k in backend.redis.scan_iter(match=prefix + "*"))  # type: ignore[attr-defined]
    if kind == "etcd":
        pairs = backend.etcd.get_prefix(backend.prefix)  # type: ignore[attr-defined]
        return sorted(meta.key.decode() for _, meta in pairs)
    table = _table(backend.server)  # type: ignore[attr-defined]
    prefix = backend.prefix  # type: ignore[attr-defined]
    held = [k for k, e in table.entries.items() if k.startswith(prefix) and e.token is not None]
    return sorted(held + [k for k in table.fences if k.startswith(prefix)])


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_acquire_release_and_nonblocking(connect: Connect) -> None:
    a, b = connect(), connect()
    mine, theirs = a.lock("res"), b.lock("res")
    assert not mine.held
    assert mine.acquire() is True
    assert mine.held
    assert theirs.acquire(blocking=False) is False
    assert theirs.acquire(timeout=0) is False
    mine.release()
    assert not mine.held
    assert theirs.acquire(blocking=False) is True
    theirs.release()


def test_mutual_exclusion_among_threads_and_clients(connect: Connect, backend: str) -> None:
    clients = [connect(), connect()]
    inside = 0
    overlaps = 0
    grants: list[int] = []
    mutex = threading.Lock()

    def worker(client: dcoord.Client) -> None:
        nonlocal inside, overlaps
        lock = client.lock("counter", ttl=TTL[backend] * 4, timeout=30)
        for _ in range(8):
            with lock:
                with mutex:
                    inside += 1
                    overlaps += inside > 1
                    grants.append(lock.fence)
                time.sleep(0.002)
                with mutex:
                    inside -= 1

    threads = [threading.Thread(target=worker, args=(clients[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert overlaps == 0
    assert len(grants) == 32
    assert grants == sorted(grants) and len(set(grants)) == 32, "fences must strictly increase"


def test_non_owner_cannot_release_or_extend(connect: Connect) -> None:
    a, b = connect(), connect()
    holder, other = a.lock("res"), b.lock("res")
    with pytest.raises(dcoord.LockNotOwned):
        other.release()
    with pytest.raises(dcoord.LockNotOwned):
        other.extend()
    with pytest.raises(dcoord.LockNotOwned):
        _ = other.fence
    holder.acquire()
    with pytest.raises(dcoord.LockNotOwned):
        other.release()
    assert holder.held
    assert other.acquire(blocking=False) is False
    holder.release()
    with pytest.raises(dcoord.LockNotOwned):
        holder.release()


def test_two_handles_of_one_client_exclude_each_other(client: dcoord.Client) -> None:
    first, second = client.lock("res"), client.lock("res")
    assert first.acquire()
    assert second.acquire(timeout=0.2) is False
    first.release()
    assert second.acquire(timeout=2)
    assert second.fence > first.fence
    second.release()


def test_handle_is_not_reentrant(client: dcoord.Client) -> None:
    lock = client.lock("res")
    lock.acquire()
    with pytest.raises(dcoord.LockError):
        lock.acquire(blocking=False)
    lock.release()


def test_token_belongs_to_the_handle_not_the_thread(client: dcoord.Client) -> None:
    lock = client.lock("res")
    acquired = threading.Event()
    threading.Thread(target=lambda: (lock.acquire(), acquired.set())).start()
    assert acquired.wait(5)
    assert lock.held
    lock.release()  # from another thread than the one that acquired
    assert client.lock("res").acquire(blocking=False)


def test_fences_increase_across_clients_and_expiry(connect: Connect, backend: str) -> None:
    a, b = connect(), connect()
    ttl = TTL[backend]
    fences = []
    first = a.lock("res", ttl=ttl, auto_renew=False)
    first.acquire()
    fences.append(first.fence)
    # b takes over after first's TTL passed without renewal.
    second = b.lock("res", ttl=ttl)
    assert second.acquire(timeout=ttl + 3)
    fences.append(second.fence)
    second.release()
    third = a.lock("res")
    third.acquire()
    fences.append(third.fence)
    third.release()
    assert fences[0] < fences[1] < fences[2]


def test_expired_lock_is_lost_and_release_raises(connect: Connect, backend: str) -> None:
    a, b = connect(), connect()
    ttl = TTL[backend]
    lost = threading.Event()
    seen: list[dcoord.Lock] = []
    lock = a.lock("res", ttl=ttl, auto_renew=False, on_lost=lambda h: (seen.append(h), lost.set()))
    lock.acquire()
    assert lock.held
    assert lost.wait(ttl + MARGIN), "on_lost must fire once the TTL passed"
    assert seen == [lock]
    assert not lock.held
    assert b.lock("res").acquire(timeout=2)
    with pytest.raises(dcoord.LockNotOwned):
        lock.release()
    with pytest.raises(dcoord.LockNotOwned):
        lock.extend()


def test_held_turns_false_at_the_ttl_even_without_the_scheduler(
    connect: Connect, backend: str
) -> None:
    lock = connect().lock("res", ttl=TTL[backend], auto_renew=False)
    started = time.monotonic()
    lock.acquire()
    assert wait_until(lambda: not lock.held, TTL[backend] + MARGIN)
    assert time.monotonic() - started <= TTL[backend] + 0.05, "held must never outlive the TTL"


def test_extend_keeps_a_lock_without_auto_renewal(connect: Connect, backend: str) -> None:
    a, b = connect(), connect()
    ttl = TTL[backend]
    lock = a.lock("res", ttl=ttl, auto_renew=False)
    lock.acquire()
    deadline = time.monotonic() + ttl * 2
    while time.monotonic() < deadline:
        time.sleep(ttl / 4)
        lock.extend()
        assert lock.held
        assert b.lock("res").acquire(blocking=False) is False
    lock.release()


@pytest.mark.slow
def test_auto_renewal_outlives_the_ttl_with_one_thread(connect: Connect, backend: str) -> None:
    a, b = connect(), connect()
    ttl = max(TTL[backend], 1.0)  # renewals need some slack on a loaded machine
    names = {t.name for t in threading.enumerate()}
    locks = [a.lock(f"res{i}", ttl=ttl) for i in range(10)]
    for lock in locks:
        lock.acquire()
    new_threads = {t.name for t in threading.enumerate()} - names
    # Acquiring starts no thread per lock: one scheduler thread per client looks after
    # everything (etcd's lease keep-alive too); renewal requests run on a few threads
    # started later, as many however many locks (tests/unit/test_lock_renewal.py).
    assert len([n for n in new_threads if n.startswith("dcoord-")]) <= 1, new_threads
    time.sleep(ttl * 2.5)
    assert all(lock.held for lock in locks)
    assert b.lock("res3").acquire(blocking=False) is False
    for lock in locks:
        lock.release()
    assert b.lock("res3").acquire(blocking=False)


def test_blocking_timeout_is_honoured_and_leaves_nothing(connect: Connect) -> None:
    a, b = connect(), connect()
    a.lock("res").acquire()
    before = stored_keys(a)
    waiter = b.lock("res", timeout=0.4)
    started = time.monotonic()
    assert waiter.acquire() is False
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 0.4 + MARGIN, elapsed
    started = time.monotonic()
    with pytest.raises(dcoord.LockTimeout), waiter:
        pytest.fail("the block must not run without the lock")
    assert 0.4 <= time.monotonic() - started < 0.4 + MARGIN
    # A timed-out waiter leaves nothing behind (etcd: its queue key is deleted).
    assert wait_until(lambda: stored_keys(a) == before, 2), (before, stored_keys(a))


def test_waiter_wakes_promptly_on_release(connect: Connect) -> None:
    a, b = connect(), connect()
    holder = a.lock("res", ttl=30)
    holder.acquire()
    got = threading.Event()
    woke_at: list[float] = []

    def wait() -> None:
        assert b.lock("res", ttl=30).acquire(timeout=20)
        woke_at.append(time.monotonic())
        got.set()

    threading.Thread(target=wait).start()
    time.sleep(0.3)  # let the waiter block (its notification wakes it, not this sleep)
    released_at = time.monotonic()
    holder.release()
    assert got.wait(10)
    # A TTL-driven (30 s) or polling waiter could not be this quick.
    assert woke_at[0] - released_at < 0.5, woke_at[0] - released_at


def test_waiter_wakes_when_the_holder_expires(connect: Connect, backend: str) -> None:
    a, b = connect(), connect()
    ttl = TTL[backend]
    a.lock("res", ttl=ttl, auto_renew=False).acquire()  # never released: like a crash
    started = time.monotonic()
    assert b.lock("res").acquire(timeout=ttl + 5)
    assert time.monotonic() - started < ttl + MARGIN + (1.0 if backend == "etcd" else 0)


def test_with_block_raises_lock_timeout_and_never_runs_unlocked(connect: Connect) -> None:
    a, b = connect(), connect()
    with a.lock("res"):
        ran = False
        with pytest.raises(dcoord.LockTimeout), b.lock("res", timeout=0.1):
            ran = True
        assert not ran


def test_with_block_releases_and_reports(connect: Connect) -> None:
    a, b = connect(), connect()
    lock = a.lock("res")
    with lock as entered:
        assert entered is lock and lock.held
    assert not lock.held
    with pytest.raises(KeyError), lock:
        raise KeyError("mine")
    assert not lock.held
    assert b.lock("res").acquire(blocking=False)


def test_exit_after_expiry_raises_lock_lost_not_a_confusing_error(
    connect: Connect, backend: str
) -> None:
    """redis-py #3532: the block completed but the lock expired on the way."""
    a, b = connect(), connect()
    ttl = TTL[backend]
    lock = a.lock("res", ttl=ttl, auto_renew=False)
    with pytest.raises(dcoord.LockLost) as info, lock:
        assert b.lock("res").acquire(timeout=ttl + 5)  # someone took over meanwhile
    assert "with-block" in str(info.value)
    # The block's own exception wins over the lost lock.
    lock2 = a.lock("other", ttl=ttl, auto_renew=False)
    with pytest.raises(ZeroDivisionError), lock2:
        wait_until(lambda: not lock2.held, ttl + MARGIN)
        _ = 1 / 0


def test_release_inside_with_block_is_fine(client: dcoord.Client) -> None:
    lock = client.lock("res")
    with lock:
        lock.release()
    assert not lock.held


def test_reacquire_after_loss_works(connect: Connect, backend: str) -> None:
    lock = connect().lock("res", ttl=TTL[backend], auto_renew=False)
    lock.acquire()
    first = lock.fence
    assert wait_until(lambda: not lock.held, TTL[backend] + MARGIN)
    assert lock.acquire(timeout=5)
    assert lock.fence > first
    lock.release()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": ""}, "lock name"),
        ({"name": 42}, "lock name"),
        ({"name": b"bytes"}, "lock name"),
        ({"name": None}, "lock name"),
        ({"name": "x" * 2000}, "lock name"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": float("nan")}, "ttl"),
        ({"ttl": float("inf")}, "ttl"),
        ({"ttl": 1e12}, "ttl"),
        ({"ttl": 0.0001}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"ttl": "soon"}, "ttl"),
        ({"timeout": -1.0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"auto_renew": "yes"}, "auto_renew"),
        ({"on_lost": 5}, "on_lost"),
    ],
)
def test_bad_lock_arguments_raise_config_error_and_write_nothing(
    client: dcoord.Client, kwargs: dict[str, object], needle: str
) -> None:
    args: dict[str, object] = {"name": "res", **kwargs}
    with pytest.raises(dcoord.ConfigError) as info:
        client.lock(**args)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError) and isinstance(info.value, dcoord.DcoordError)
    assert needle in str(info.value)
    assert stored_keys(client) == []


def test_bad_acquire_and_extend_arguments(client: dcoord.Client) -> None:
    lock = client.lock("res")
    for bad in (float("nan"), -5, float("inf"), "1"):
        with pytest.raises(dcoord.ConfigError):
            lock.acquire(timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(dcoord.ConfigError):
        lock.acquire(blocking=False, timeout=1)
    assert stored_keys(client) == []
    lock.acquire()
    for bad in (0, -1, float("nan"), 1e12):
        with pytest.raises(dcoord.ConfigError):
            lock.extend(bad)
    assert lock.held
    lock.release()


def test_fence_admits_only_non_decreasing_tokens(connect: Connect) -> None:
    a, b = connect(), connect()
    fa, fb = a.fence("table"), b.fence("table")
    assert fa.highest() is None
    assert fa.admit(10)
    assert fb.admit(10), "the same token again is admitted (one holder, several writes)"
    assert not fb.admit(9)
    assert fa.admit(2**62)
    assert not fa.admit(2**62 - 1)
    assert fb.highest() == 2**62
    assert a.fence("other").admit(1), "fences of different resources are independent"


def test_fence_rejects_bad_tokens_and_names(client: dcoord.Client) -> None:
    fence = client.fence("table")
    for bad in (-1, 1.5, True, "7", 2**63, None):
        with pytest.raises(dcoord.ConfigError):
            fence.admit(bad)  # type: ignore[arg-type]
    for name in ("", 3, None):
        with pytest.raises(dcoord.ConfigError):
            client.fence(name)  # type: ignore[arg-type]
    assert stored_keys(client) == []


def test_lock_fences_gate_a_fenced_resource(connect: Connect, backend: str) -> None:
    """The stale holder's fence loses against its successor's once that one wrote."""
    a, b = connect(), connect()
    ttl = TTL[backend]
    stale = a.lock("res", ttl=ttl, auto_renew=False)
    stale.acquire()
    assert a.fence("table").admit(stale.fence)
    successor = b.lock("res")
    assert successor.acquire(timeout=ttl + 5)
    assert b.fence("table").admit(successor.fence)
    assert not a.fence("table").admit(stale.fence)
    successor.release()


def test_names_with_separators_are_distinct_locks(client: dcoord.Client) -> None:
    names = ["a", "a/b", "a%2Fb", "{a}", "a:b", "ünï", "a}{"]
    locks = [client.lock(n) for n in names]
    for lock in locks:
        assert lock.acquire(blocking=False), lock.name
    for lock in locks:
        lock.release()
    # Holding the longer name does not block the shorter (etcd prefixes must not nest).
    inner = client.lock("a/b")
    inner.acquire()
    outer = client.lock("a")
    assert outer.acquire(blocking=False)
    outer.release()
    inner.release()


def test_close_releases_held_locks(connect: Connect) -> None:
    a, b = connect(), connect()
    a.lock("res", ttl=30).acquire()
    a.close()
    assert b.lock("res").acquire(timeout=2), "a closed client must not hold locks until TTL"


def test_acquire_on_a_closed_client_raises_client_closed(connect: Connect) -> None:
    client = connect()
    lock = client.lock("res")
    client.close()
    with pytest.raises(dcoord.ClientClosed, match="res"):
        lock.acquire()
    with pytest.raises(dcoord.ClientClosed), lock:
        pytest.fail("the block must not run")


def test_fence_survives_a_server_restart(
    real_backend: str, server_factory: Callable[..., object], namespace: str
) -> None:
    servers = [server_factory(real_backend)]
    if real_backend == "redis":
        servers.append(server_factory("redis", persistent=False))
    for server in servers:
        url = server.url  # type: ignore[attr-defined]
        with dcoord.connect(url, namespace=namespace) as client:
            lock = client.lock("res")
            lock.acquire()
            before = lock.fence
            lock.release()
        server.restart()  # type: ignore[attr-defined]
        with dcoord.connect(url, namespace=namespace) as client:
            lock = client.lock("res")
            assert lock.acquire(timeout=10)
            assert lock.fence > before, (server, before, lock.fence)
            lock.release()


# -- backend specifics -----------------------------------------------------------------


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_scripts_reload_after_script_flush(real_backend_url: str, namespace: str) -> None:
    with dcoord.connect(real_backend_url, namespace=namespace) as client:
        lock = client.lock("res")
        lock.acquire()
        client.backend.redis.script_flush()  # type: ignore[attr-defined]
        lock.release()  # EVALSHA -> NOSCRIPT -> SCRIPT LOAD -> EVALSHA
        assert lock.acquire(blocking=False)
        lock.release()


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_keys_of_a_lock_share_one_cluster_slot(real_backend_url: str) -> None:
    from redis.crc import key_slot

    with dcoord.connect(real_backend_url) as client:
        for name in ["orders:42", "}", "{x}", "a}b{c", "%7D"]:
            slot = client.backend.locks.slot(name, 1.0, True)  # type: ignore[attr-defined]
            assert key_slot(slot.key.encode()) == key_slot(slot.fence_key.encode()), name


@pytest.mark.parametrize("real_backend", ["etcd"], indirect=True)
def test_etcd_lock_without_renewal_revokes_its_lease(real_backend_url: str) -> None:
    with dcoord.connect(real_backend_url) as client:
        lock = client.lock("res", ttl=30, auto_renew=False)
        lock.acquire()
        lease_id = lock._slot._lease.id  # type: ignore[attr-defined]
        etcd = client.backend.etcd  # type: ignore[attr-defined]
        assert etcd.get_lease_info(lease_id).TTL > 0
        lock.release()
        assert etcd.get_lease_info(lease_id).TTL == -1, "a released lock must not leak its lease"


@pytest.mark.parametrize("real_backend", ["etcd"], indirect=True)
def test_etcd_waiters_are_served_in_request_order(real_backend_url: str, namespace: str) -> None:
    clients = [dcoord.connect(real_backend_url, namespace=namespace) for _ in range(4)]
    try:
        holder = clients[0].lock("res")
        holder.acquire()
        order: list[int] = []
        threads = []
        for i in (1, 2, 3):

            def wait(i: int = i) -> None:
                lock = clients[i].lock("res")
                assert lock.acquire(timeout=20)
                order.append(i)
                lock.release()

            threads.append(threading.Thread(target=wait))
            threads[-1].start()
            # The next waiter queues only after this one's key exists.
            assert wait_until(lambda i=i: len(stored_keys(clients[0])) == i + 1, 5)
        holder.release()
        for t in threads:
            t.join(timeout=20)
        assert order == [1, 2, 3]
    finally:
        for c in clients:
            c.close()


class LostReply:
    """A Lua script stand-in whose chosen calls lose their reply (redis ConnectionError).

    ``lose(n)`` says whether call ``n`` (from 1) loses its reply; ``run_lost`` whether such
    a call still ran on the server first. ``done`` is set after each call.
    """

    def __init__(self, real: Any, lose: Callable[[int], bool], *, run_lost: bool) -> None:
        self.real = real
        self.lose = lose
        self.run_lost = run_lost
        self.calls = 0
        self.done = threading.Event()

    def __call__(self, client: Any, keys: Any, args: Any) -> Any:
        self.calls += 1
        try:
            if self.lose(self.calls):
                if self.run_lost:
                    self.real(client, keys, args)
                raise redis.ConnectionError("reply lost (test)")
            return self.real(client, keys, args)
        finally:
            self.done.set()


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
@pytest.mark.parametrize("first_attempt_ran", [False, True])
def test_redis_release_retry_finding_nothing_is_an_unknown_outcome(
    real_backend_url: str, namespace: str, first_attempt_ran: bool
) -> None:
    """A retried release that finds nothing used to count as released, which hid a lost
    lock (here: its key vanished, as in a failover) behind a clean with-block."""
    with dcoord.connect(real_backend_url, namespace=namespace) as client:
        locks = client.backend.locks  # type: ignore[attr-defined]
        lock = client.lock("res")
        with pytest.raises(dcoord.LockLost), lock:  # negative control: no reply lost
            client.backend.redis.delete(lock._slot.key)  # type: ignore[attr-defined]
        locks.release_script = LostReply(
            type(locks).release_script, lambda n: n == 1, run_lost=first_attempt_ran
        )
        with pytest.raises(dcoord.BackendUnavailable, match="outcome is unknown"), lock:
            if not first_attempt_ran:
                client.backend.redis.delete(lock._slot.key)  # type: ignore[attr-defined]
        assert client.lock("res").acquire(blocking=False)


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_orphan_of_a_lost_acquire_reply_is_removed_once_the_server_answers(
    real_backend_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The acquire ran but its reply was lost, and so did the one undo (a partition):
    the orphan used to block the lock for its whole TTL."""
    from dcoord.backends.redis import locks as redis_locks

    partition = threading.Event()
    partition.set()
    acquire = LostReply(redis_locks.ACQUIRE, lambda n: n == 1, run_lost=True)
    monkeypatch.setattr(redis_locks, "ACQUIRE", acquire)
    with (
        dcoord.connect(real_backend_url, namespace=namespace) as a,
        dcoord.connect(real_backend_url, namespace=namespace) as b,
    ):
        a.backend.locks.release_script = LostReply(  # type: ignore[attr-defined]
            redis_locks.RELEASE, lambda n: partition.is_set(), run_lost=False
        )
        with pytest.raises(dcoord.BackendUnavailable):
            a.lock("res", ttl=60).acquire()
        waiter = b.lock("res")
        assert waiter.acquire(timeout=0) is False, "the orphan grant exists"
        partition.clear()
        assert waiter.acquire(timeout=10), "the orphan must go once the server answers"
        waiter.release()


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_orphan_cleanup_catches_an_acquire_that_lands_after_the_undo(
    real_backend_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The acquire is still queued when the undo runs (a paused server serving the new
    connection first): the one undo used to find nothing and the late grant stood."""
    from dcoord.backends.redis import locks as redis_locks

    real_acquire = redis_locks.ACQUIRE
    landed = threading.Event()

    with (
        dcoord.connect(real_backend_url, namespace=namespace) as a,
        dcoord.connect(real_backend_url, namespace=namespace) as b,
    ):
        undo = LostReply(redis_locks.RELEASE, lambda n: False, run_lost=False)
        a.backend.locks.release_script = undo  # type: ignore[attr-defined]

        def queued(client: Any, keys: Any, args: Any) -> Any:
            def land() -> None:
                assert undo.done.wait(10)  # the first undo has run: now the acquire does
                real_acquire(client, keys, args)
                landed.set()

            threading.Thread(target=land, daemon=True).start()
            raise redis.ConnectionError("reply lost (test)")

        monkeypatch.setattr(redis_locks, "ACQUIRE", queued)
        with pytest.raises(dcoord.BackendUnavailable):
            a.lock("res", ttl=60).acquire()
        monkeypatch.setattr(redis_locks, "ACQUIRE", real_acquire)
        assert landed.wait(10)
        waiter = b.lock("res")
        assert waiter.acquire(timeout=10), "the late grant must be undone too"
        waiter.release()


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_ttl_is_rounded_up_to_whole_milliseconds(
    real_backend_url: str, namespace: str
) -> None:
    """round() could make the server's TTL shorter than the client believes."""
    sent: list[tuple[object, ...]] = []

    class Recorder:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def execute_command(self, *args: object) -> Any:
            sent.append(args)
            return self.inner.execute_command(*args)

    with dcoord.connect(real_backend_url, namespace=namespace) as client:
        lock = client.lock("res", ttl=1.0005, auto_renew=False)
        lock._slot._redis = Recorder(lock._slot._redis)  # type: ignore[attr-defined]
        lock.acquire()
        lock.extend(1.5005)
        lock.release()
    evals = [args for args in sent if args[0] == "EVALSHA"]
    # EVALSHA sha numkeys key fence_key token ms ... / EVALSHA sha 1 key token ms
    assert int(evals[0][6]) == 1001, evals[0]  # type: ignore[call-overload]
    assert int(evals[1][5]) == 1501, evals[1]  # type: ignore[call-overload]


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_fence_skew_margin_lifts_the_first_fence_of_a_counter(
    real_backend_url: str, namespace: str
) -> None:
    margin = 3600.0
    with dcoord.connect(real_backend_url, namespace=namespace) as plain:
        lock = plain.lock("plain")
        lock.acquire()
        lock.release()
        clock_fence = lock.fence  # about the server's time in microseconds
    with dcoord.connect(real_backend_url, namespace=namespace, fence_skew_margin=margin) as client:
        lock = client.lock("new")
        lock.acquire()
        first = lock.fence
        lock.release()
        assert first >= clock_fence + margin * 1e6
        lock.acquire()
        assert lock.fence == first + 1, "an existing counter goes on from where it is"
        lock.release()
        # An existing counter is not lifted: the margin would cancel out if every grant
        # carried it.
        old = client.lock("plain")
        old.acquire()
        assert clock_fence < old.fence < clock_fence + margin * 1e6
        old.release()
    query = "&" if "?" in real_backend_url else "?"  # the TLS run's URL has a query already
    with dcoord.connect(
        f"{real_backend_url}{query}fence_skew_margin=0", namespace=namespace
    ) as none:
        lock = none.lock("newer")
        lock.acquire()
        assert lock.fence < clock_fence + margin * 1e6, "a margin of 0 lifts nothing"
        lock.release()
    for bad in (-1, "soon", 7200):
        with pytest.raises(dcoord.ConfigError, match="fence_skew_margin"):
            dcoord.connect(real_backend_url, fence_skew_margin=bad)
