"""Read-write locks: the same assertions on every backend (memory, Redis, etcd)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import pytest

import dcoord
from tests.conformance.test_locks import wait_until
from tests.conformance.test_semaphore import MARGIN, TTL, stored

Connect = Callable[..., dcoord.Client]


def test_readers_share_and_a_writer_excludes(connect: Connect) -> None:
    a, b = connect(), connect()
    first, second = a.rwlock("doc").read(), b.rwlock("doc").read()
    writer = b.rwlock("doc").write()
    assert first.acquire(blocking=False) and second.acquire(blocking=False)
    assert writer.acquire(blocking=False) is False
    first.release()
    assert writer.acquire(timeout=0.2) is False
    second.release()
    assert writer.acquire(blocking=False)
    assert a.rwlock("doc").read().acquire(blocking=False) is False
    assert a.rwlock("doc").write().acquire(blocking=False) is False
    assert writer.fence > max(first.fence, second.fence)
    writer.release()
    assert a.rwlock("doc").read().acquire(blocking=False)


def test_a_waiting_writer_blocks_new_readers(connect: Connect) -> None:
    """Writers are not starved: once a writer waits, readers that come later queue."""
    a, b, c = connect(), connect(), connect()
    reader = a.rwlock("doc").read()
    assert reader.acquire()
    writer = b.rwlock("doc").write()
    got: list[int] = []
    before = len(stored(a))
    threading.Thread(target=lambda: got.append(writer.acquire(timeout=30) and 1)).start()
    late = c.rwlock("doc").read()
    # Once the writer waits (its claim is on the server), a new reader is refused.
    assert wait_until(lambda: len(stored(a)) > before, 5)
    assert late.acquire(blocking=False) is False
    assert late.acquire(timeout=0.3) is False
    assert not got
    reader.release()
    assert wait_until(lambda: got == [1], 10)
    assert writer.fence > reader.fence
    late_done: list[bool] = []
    threading.Thread(target=lambda: late_done.append(late.acquire(timeout=30))).start()
    time.sleep(0.2)
    assert not late_done, "a reader got in while the writer held the lock"
    writer.release()
    assert wait_until(lambda: late_done == [True], 10)
    assert late.fence > writer.fence
    late.release()


def test_a_writer_that_gives_up_lets_the_readers_behind_it_in(connect: Connect) -> None:
    a, b, c = connect(), connect(), connect()
    reader = a.rwlock("doc").read()
    assert reader.acquire()
    writer = b.rwlock("doc", timeout=1.0).write()
    gave_up = threading.Event()
    before = len(stored(a))
    threading.Thread(target=lambda: writer.acquire() or gave_up.set()).start()
    late = c.rwlock("doc").read()
    assert wait_until(lambda: len(stored(a)) > before, 5)
    assert late.acquire(blocking=False) is False
    started = time.monotonic()
    assert late.acquire(timeout=10), "the reader must get in once the writer gave up"
    assert gave_up.wait(MARGIN)  # (the thread that records it may lag the wake-up)
    assert time.monotonic() - started < 1.0 + MARGIN
    late.release()
    reader.release()


def test_one_writer_or_many_readers_under_contention(connect: Connect) -> None:
    clients = [connect(), connect()]
    readers = writers = 0
    violations: list[str] = []
    most_readers = 0
    write_fences: list[int] = []
    mutex = threading.Lock()

    def worker(i: int) -> None:
        nonlocal readers, writers, most_readers
        rng = random.Random(i)
        rw = clients[i % 2].rwlock("doc", ttl=10, timeout=60)
        for _ in range(6):
            write = rng.random() < 0.3
            handle = rw.write() if write else rw.read()
            with handle:
                with mutex:
                    if write:
                        writers += 1
                        write_fences.append(handle.fence)
                    else:
                        readers += 1
                        most_readers = max(most_readers, readers)
                    if writers > 1 or (writers and readers):
                        violations.append(f"{writers} writers and {readers} readers")
                time.sleep(0.01)
                with mutex:
                    if write:
                        writers -= 1
                    else:
                        readers -= 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert violations == []
    assert write_fences == sorted(write_fences) and len(set(write_fences)) == len(write_fences)


def test_a_silent_writer_expires_and_on_lost_fires(connect: Connect, backend: str) -> None:
    a, b = connect(), connect()
    ttl = TTL[backend]
    lost = threading.Event()
    writer = a.rwlock("doc", ttl=ttl).write(auto_renew=False, on_lost=lambda _: lost.set())
    assert writer.acquire()
    reader = b.rwlock("doc").read()
    started = time.monotonic()
    assert reader.acquire(timeout=ttl + 5)
    assert time.monotonic() - started < ttl + MARGIN + (1.0 if backend == "etcd" else 0)
    assert reader.fence > writer.fence
    assert lost.wait(MARGIN) and not writer.held
    with pytest.raises(dcoord.LockNotOwned):
        writer.release()
    reader.release()


def test_a_silent_reader_expires(connect: Connect, backend: str) -> None:
    a, b = connect(), connect()
    ttl = TTL[backend]
    reader = a.rwlock("doc", ttl=ttl).read(auto_renew=False)
    assert reader.acquire()
    writer = b.rwlock("doc").write()
    assert writer.acquire(timeout=ttl + 5)
    assert writer.fence > reader.fence
    writer.release()


def test_timeout_is_honoured_and_leaves_nothing(connect: Connect) -> None:
    a, b = connect(), connect()
    assert a.rwlock("doc").write().acquire()
    before = stored(a)
    for handle in (b.rwlock("doc", timeout=0.4).read(), b.rwlock("doc", timeout=0.4).write()):
        started = time.monotonic()
        assert handle.acquire() is False
        assert 0.4 <= time.monotonic() - started < 0.4 + MARGIN
        with pytest.raises(dcoord.LockTimeout, match="not acquired"), handle:
            pytest.fail("the block must not run without the lock")
    assert wait_until(lambda: stored(a) == before, 3), (before, stored(a))


def test_with_blocks_and_close(connect: Connect) -> None:
    a, b = connect(), connect()
    with a.rwlock("doc").write() as writer:
        assert writer.held
        assert b.rwlock("doc").read().acquire(blocking=False) is False
    assert not writer.held
    a.rwlock("doc", ttl=30).read().acquire()
    a.close()
    assert b.rwlock("doc").write().acquire(timeout=3), "a closed client must not keep the lock"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": ""}, "rwlock name"),
        ({"name": None}, "rwlock name"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": float("inf")}, "ttl"),
        ({"timeout": -1.0}, "timeout"),
        ({"timeout": "1"}, "timeout"),
    ],
)
def test_bad_arguments_raise_config_error_and_write_nothing(
    client: dcoord.Client, kwargs: dict[str, object], needle: str
) -> None:
    args: dict[str, object] = {"name": "doc", **kwargs}
    with pytest.raises(dcoord.ConfigError) as info:
        client.rwlock(**args)  # type: ignore[arg-type]
    assert needle in str(info.value)
    rw = client.rwlock("doc")
    with pytest.raises(dcoord.ConfigError, match="on_lost"):
        rw.read(on_lost=5)  # type: ignore[arg-type]
    with pytest.raises(dcoord.ConfigError, match="auto_renew"):
        rw.write(auto_renew="no")  # type: ignore[arg-type]
    assert stored(client) == []


@pytest.mark.parametrize("real_backend", ["redis"], indirect=True)
def test_redis_keys_of_an_rwlock_share_one_cluster_slot(real_backend_url: str) -> None:
    from redis.crc import key_slot

    with dcoord.connect(real_backend_url) as client:
        for name in ["doc:1", "}", "{x}"]:
            for write in (False, True):
                slot = client.backend.rwlocks.slot(name, write, 1.0, True)
                keys = [*slot.keys, slot.channel]  # type: ignore[attr-defined]
                assert len({key_slot(k.encode()) for k in keys}) == 1, name
