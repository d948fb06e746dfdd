"""Counting semaphores: the same assertions on every backend (memory, Redis, etcd)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import dcoord
from dcoord.backends.memory.semaphore import queue_table
from dcoord.backends.redis.inspect import subscribers
from tests.conformance.test_locks import stored_keys, wait_until

# Short TTLs keep the suite fast; etcd's minimum lease is about 2 s.
TTL = {"memory": 0.5, "redis": 0.5, "etcd": 2.0}
# Slack for thread wake-ups and round trips on a loaded 2-core machine.
MARGIN = 1.0

Connect = Callable[..., dcoord.Client]


def stored(client: dcoord.Client) -> list[str]:
    """Every key the client's namespace holds (memory: queued semaphore/rwlock entries too)."""
    keys = stored_keys(client)
    if client.backend.kind == "memory":
        prefix = client.backend.prefix  # type: ignore[attr-defined]
        table = queue_table(client.backend.server)  # type: ignore[attr-defined]
        with table.mutex:
            keys += [
                f"{name}#{i}"
                for name, queue in table.queues.items()
                if name.startswith(prefix)
                for i in range(len(queue.entries))
            ]
    return sorted(keys)


def test_limit_holders_at_once_then_the_next(connect: Connect) -> None:
    a, b = connect(), connect()
    first, second, third = a.semaphore("pool", 2), b.semaphore("pool", 2), a.semaphore("pool", 2)
    assert first.acquire(blocking=False) and second.acquire(blocking=False)
    assert first.held and second.held
    assert third.acquire(blocking=False) is False
    assert third.acquire(timeout=0.2) is False
    first.release()
    assert not first.held
    assert third.acquire(blocking=False) is True
    assert first.fence < second.fence < third.fence
    assert first.acquire(blocking=False) is False
    second.release()
    third.release()


def test_never_more_than_limit_holders_and_fences_increase(connect: Connect) -> None:
    clients = [connect(), connect()]
    limit = 3
    inside = most = 0
    grants: list[int] = []
    mutex = threading.Lock()

    def worker(client: dcoord.Client) -> None:
        nonlocal inside, most
        permit = client.semaphore("pool", limit, ttl=10, timeout=30)
        for _ in range(6):
            with permit:
                with mutex:
                    inside += 1
                    most = max(most, inside)
                    grants.append(permit.fence)
                time.sleep(0.01)
                with mutex:
                    inside -= 1

    threads = [threading.Thread(target=worker, args=(clients[i % 2],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads)
    assert most <= limit, f"{most} holders at once with limit {limit}"
    assert most >= 2, "holders never overlapped: the semaphore behaved like a lock"
    assert len(grants) == 36 and len(set(grants)) == 36, "every grant has its own fence"


def test_fence_grows_with_every_grant_in_real_time(connect: Connect) -> None:
    a, b = connect(), connect()
    fences = []
    for client in (a, b, a, b):
        permit = client.semaphore("pool", 2)
        assert permit.acquire(timeout=5)
        fences.append(permit.fence)
        permit.release()
    assert fences == sorted(fences) and len(set(fences)) == 4


def test_a_silent_holder_frees_its_permit_within_its_ttl(connect: Connect, backend: str) -> None:
    a, b = connect(), connect()
    ttl = TTL[backend]
    lost = threading.Event()
    seen: list[dcoord.Semaphore] = []
    silent = a.semaphore(
        "pool", 1, ttl=ttl, auto_renew=False, on_lost=lambda h: (seen.append(h), lost.set())
    )
    assert silent.acquire()
    started = time.monotonic()
    waiter = b.semaphore("pool", 1)
    assert waiter.acquire(timeout=ttl + 5)
    assert time.monotonic() - started < ttl + MARGIN + (1.0 if backend == "etcd" else 0)
    assert waiter.fence > silent.fence
    assert lost.wait(MARGIN), "on_lost must fire once the TTL passed"
    assert seen == [silent] and not silent.held
    with pytest.raises(dcoord.LockNotOwned):
        silent.release()
    waiter.release()


def test_auto_renewal_keeps_a_permit_past_its_ttl(connect: Connect, backend: str) -> None:
    a, b = connect(), connect()
    ttl = max(TTL[backend], 1.0)  # renewals need some slack on a loaded machine
    permit = a.semaphore("pool", 1, ttl=ttl)
    assert permit.acquire()
    # Poll for a while: the permit must stay held and the semaphore full throughout.
    deadline = time.monotonic() + ttl * 2.5
    while time.monotonic() < deadline:
        assert permit.held
        assert b.semaphore("pool", 1).acquire(blocking=False) is False
        time.sleep(ttl / 4)
    permit.release()
    assert b.semaphore("pool", 1).acquire(blocking=False)


def test_waiter_wakes_promptly_on_release(connect: Connect) -> None:
    a, b = connect(), connect()
    holder = a.semaphore("pool", 1, ttl=30)
    holder.acquire()
    got = threading.Event()
    woke_at: list[float] = []
    waiting = threading.Event()

    def wait() -> None:
        waiting.set()
        assert b.semaphore("pool", 1, ttl=30).acquire(timeout=20)
        woke_at.append(time.monotonic())
        got.set()

    before = len(stored(a))
    threading.Thread(target=wait).start()
    assert waiting.wait(5)
    # The waiter is waiting once the server knows it: its queue entry or key (memory,
    # etcd), its subscription to the release channel (Redis).
    if a.backend.kind == "redis":
        channel = a.backend.semaphores.slot("pool", 1, 30, True).channel  # type: ignore[attr-defined]
        assert wait_until(lambda: subscribers(a.backend, channel) > 0, 5)  # type: ignore[arg-type]
    else:
        assert wait_until(lambda: len(stored(a)) > before, 5)
    released_at = time.monotonic()
    holder.release()
    assert got.wait(10)
    # A TTL-driven (30 s) or polling waiter could not be this quick.
    assert woke_at[0] - released_at < 0.5, woke_at[0] - released_at


def test_timeout_is_honoured_and_leaves_nothing(connect: Connect) -> None:
    a, b = connect(), connect()
    a.semaphore("pool", 1).acquire()
    before = stored(a)
    waiter = b.semaphore("pool", 1, timeout=0.4)
    started = time.monotonic()
    assert waiter.acquire() is False
    assert 0.4 <= time.monotonic() - started < 0.4 + MARGIN
    with pytest.raises(dcoord.LockTimeout, match="no permit"), waiter:
        pytest.fail("the block must not run without a permit")
    assert wait_until(lambda: stored(a) == before, 3), (before, stored(a))


def test_with_block_holds_and_releases(connect: Connect) -> None:
    a, b = connect(), connect()
    permit = a.semaphore("pool", 1)
    with permit as entered:
        assert entered is permit and permit.held
        assert b.semaphore("pool", 1).acquire(blocking=False) is False
    assert not permit.held
    assert b.semaphore("pool", 1).acquire(blocking=False)


def test_close_releases_permits(connect: Connect) -> None:
    a, b = connect(), connect()
    a.semaphore("pool", 1, ttl=30).acquire()
    a.close()
    assert b.semaphore("pool", 1).acquire(timeout=3), "a closed client must not keep permits"


def test_names_and_primitives_are_independent(client: dcoord.Client) -> None:
    names = ["a", "a/b", "{a}", "a}{", "ünï"]
    for name in names:
        assert client.semaphore(name, 1).acquire(blocking=False), name
    # A lock and an rwlock of the same name are other things.
    assert client.lock("a").acquire(blocking=False)
    assert client.rwlock("a").write().acquire(blocking=False)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": -1}, "limit"),
        ({"limit": 1.5}, "limit"),
        ({"limit": True}, "limit"),
        ({"limit": "2"}, "limit"),
        ({"limit": None}, "limit"),
        ({"limit": 10**9}, "limit"),
        ({"name": ""}, "semaphore name"),
        ({"name": 7}, "semaphore name"),
        ({"name": "x" * 2000}, "semaphore name"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": float("nan")}, "ttl"),
        ({"ttl": "soon"}, "ttl"),
        ({"timeout": -1.0}, "timeout"),
        ({"auto_renew": "yes"}, "auto_renew"),
        ({"on_lost": 5}, "on_lost"),
    ],
)
def test_bad_arguments_raise_config_error_and_write_nothing(
    client: dcoord.Client, kwargs: dict[str, object], needle: str
) -> None:
    args: dict[str, object] = {"name": "pool", "limit": 2, **kwargs}
    with pytest.raises(dcoord.ConfigError) as info:
        client.semaphore(**args)  # type: ignore[arg-type]
    assert needle in str(info.value)
    bad = next(iter(kwargs.values()))
    if isinstance(bad, int | str) and not isinstance(bad, bool) and len(str(bad)) < 20:
        assert repr(bad)[:20] in str(info.value), info.value
    assert stored(client) == []


def test_bad_acquire_arguments_write_nothing(client: dcoord.Client) -> None:
    permit = client.semaphore("pool", 2)
    for bad in (float("nan"), -5, "1"):
        with pytest.raises(dcoord.ConfigError):
            permit.acquire(timeout=bad)  # type: ignore[arg-type]
    assert stored(client) == []


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_keys_of_a_semaphore_share_one_cluster_slot(real_backend_url: str) -> None:
    from redis.crc import key_slot

    with dcoord.connect(real_backend_url) as client:
        for name in ["jobs:42", "}", "{x}", "a}b{c"]:
            slot = client.backend.semaphores.slot(name, 2, 1.0, True)
            keys = [*slot.keys, slot.channel]  # type: ignore[attr-defined]
            assert len({key_slot(k.encode()) for k in keys}) == 1, name


# Redis only in CI: on etcd the waiters end ClientClosed as well (checked by hand, 12 of
# 12 closes), but grpc may crash the process when a channel closes under calls of other
# threads, which a test suite cannot afford.
@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_closing_the_client_stops_its_waiters_with_client_closed(
    real_backend_url: str, namespace: str
) -> None:
    """Before: the waiter of a closing client spun on reconnects until its timeout, or
    raised the closed connection's BackendUnavailable."""
    with dcoord.connect(real_backend_url, namespace=namespace) as holder:
        assert holder.semaphore("pool", 1).acquire()
        assert holder.rwlock("doc").write().acquire()
        waiter = dcoord.connect(real_backend_url, namespace=namespace)
        handles = [waiter.semaphore("pool", 1), waiter.rwlock("doc").read()]
        outcomes: list[object] = []
        started = threading.Semaphore(0)

        def wait(handle: dcoord.Lock) -> None:
            started.release()
            try:
                outcomes.append(handle.acquire(timeout=20))
            except dcoord.DcoordError as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=wait, args=(h,)) for h in handles]
        for t in threads:
            t.start()
        # Closing before, during or after the waiters queue: each must end ClientClosed.
        assert started.acquire(timeout=5) and started.acquire(timeout=5)
        waiter.close()
        for t in threads:
            t.join(timeout=10)
        assert [type(o) for o in outcomes] == [dcoord.ClientClosed] * 2, outcomes


def test_a_closed_client_raises_client_closed(connect: Connect) -> None:
    client = connect()
    permit, rw = client.semaphore("pool", 1), client.rwlock("doc")
    reader = rw.read()
    client.close()
    attempts: dict[str, Callable[[], object]] = {
        "semaphore": lambda: client.semaphore("pool", 1),
        "rwlock": lambda: client.rwlock("doc"),
        "read": rw.read,
        "write": rw.write,
        "permit.acquire": permit.acquire,
        "reader.acquire": reader.acquire,
    }
    raised = {}
    for what, attempt in attempts.items():
        try:
            attempt()
        except Exception as exc:
            # The factories name the client (as every factory does); acquire says that
            # the client is closed in the lock's words.
            named = "." in what or client.url in str(exc)
            raised[what] = (
                "ClientClosed" if isinstance(exc, dcoord.ClientClosed) and named else repr(exc)
            )
        else:
            raised[what] = "nothing"
    assert raised == dict.fromkeys(attempts, "ClientClosed")


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_release_is_retried_while_the_server_restarts(
    real_backend: str, server_factory: Callable[..., object], namespace: str
) -> None:
    """A release that meets a restarting server (connection refused) is retried until
    the server is back, within the request timeout, as a lock's release is."""
    server: Any = server_factory("redis")  # AOF, fsync always: the permits survive
    with dcoord.connect(server.url, namespace=namespace, request_timeout=15) as client:
        for handle in (client.semaphore("pool", 1), client.rwlock("doc").write()):
            assert handle.acquire()
            server.kill()
            restart = threading.Thread(target=server.start)
            restart.start()
            try:
                handle.release()  # before the fix: BackendUnavailable at the first refusal
            finally:
                restart.join()
            assert not handle.held
        assert client.semaphore("pool", 1).acquire(blocking=False)
        assert client.rwlock("doc").read().acquire(blocking=False)


# The commands docs/semaphore.md says the scripts use, and what every client sends.
SCRIPT_COMMANDS = "time get set del pttl pexpire zadd zrange zrangebyscore zrem publish"
CLIENT_COMMANDS = "info client|setname evalsha script|load ping subscribe unsubscribe"


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_user_confined_to_the_documented_commands_runs_both(
    real_backend: str, server_factory: Callable[..., object]
) -> None:
    """A namespace-confined ACL user needs no more commands than the docs list."""
    import redis

    server: Any = server_factory("redis", persistent=False)
    admin = redis.Redis(host="127.0.0.1", port=server.port)
    grants = [f"+{c}" for c in f"{SCRIPT_COMMANDS} {CLIENT_COMMANDS}".split()]
    admin.execute_command(
        "ACL", "SETUSER", "app1", "reset", "on", ">pw", "~dcoord:app1:*", "&dcoord:app1:*", *grants
    )
    admin.close()
    url = f"redis://app1:pw@127.0.0.1:{server.port}/0"
    with dcoord.connect(url, namespace="app1") as a, dcoord.connect(url, namespace="app1") as b:
        permit = a.semaphore("pool", 1)
        assert permit.acquire()
        permit.extend()
        got: list[bool] = []
        waiter = threading.Thread(target=lambda: got.append(b.semaphore("pool", 1).acquire(5)))
        waiter.start()
        permit.release()
        waiter.join()
        assert got == [True]
        reader = a.rwlock("doc").read()
        assert reader.acquire()
        reader.extend()
        assert b.rwlock("doc", timeout=0.3).write().acquire() is False  # claims, withdraws
        reader.release()
        writer = b.rwlock("doc").write()
        assert writer.acquire(blocking=False)
        writer.extend()
        writer.release()
