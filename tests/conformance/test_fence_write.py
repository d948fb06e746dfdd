"""Fenced writes (``client.fence(resource).write(token, key, value)``) on every backend.

The check and the write are one atomic step on the server: a stale holder never writes,
not even one that passed a separate check before it paused. The keys carry the
resource's hash tag (``{account}balance``), as a Redis Cluster requires.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest

import dcoord

TTL = {"memory": 0.3, "redis": 0.3, "etcd": 2.0}

Connect = Callable[..., dcoord.Client]


def test_write_admits_and_writes_in_one_step(client: dcoord.Client) -> None:
    guard = client.fence("account")
    assert guard.write(5, "{account}balance", b"100") is True
    assert client.backend.kv.get("{account}balance") == b"100"
    assert guard.highest() == 5
    # The same token writes again (one holder, several writes); a larger one raises the bar.
    assert guard.write(5, "{account}balance", b"101") is True
    assert guard.write(7, "{account}balance", b"102") is True
    assert guard.highest() == 7
    assert client.backend.kv.get("{account}balance") == b"102"


def test_stale_token_writes_nothing(client: dcoord.Client) -> None:
    guard = client.fence("account")
    assert guard.admit(10)
    assert guard.write(9, "{account}balance", b"stale") is False
    assert client.backend.kv.get("{account}balance") is None
    assert guard.write(10, "{account}balance", b"fresh") is True
    assert guard.write(3, "{account}balance", b"stale") is False
    assert client.backend.kv.get("{account}balance") == b"fresh"
    assert guard.highest() == 10
    # A write admits: after it, a separate admit of a smaller token fails too.
    assert guard.write(12, "{account}other", b"x") is True
    assert guard.admit(11) is False


def test_resources_and_namespaces_are_separate(connect: Connect) -> None:
    a, b = connect(namespace="fence-a"), connect(namespace="fence-b")
    assert a.fence("r1").write(100, "{r1}k", b"a")
    assert a.fence("r2").write(1, "{r2}k2", b"a2")  # another resource has its own highest
    assert b.fence("r1").write(1, "{r1}k", b"b")  # another namespace too
    assert a.backend.kv.get("{r1}k") == b"a"
    assert b.backend.kv.get("{r1}k") == b"b"


def test_concurrent_writers_leave_the_largest_tokens_value(connect: Connect) -> None:
    """Racing writers: the largest token always wins, whatever the interleaving.

    A check-then-write that is not atomic lets a smaller token pass its check, lose the
    race, and overwrite the larger token's value.
    """
    clients = [connect() for _ in range(4)]
    rng = random.Random(4)
    results: dict[int, bool] = {}

    def write(start: threading.Barrier, token: int, client: dcoord.Client, round_: int) -> None:
        start.wait()
        results[token] = client.fence(f"race-{round_}").write(
            token, f"{{race-{round_}}}value", str(token).encode()
        )

    for round_ in range(15):
        tokens = rng.sample(range(1, 1000), 8)
        start = threading.Barrier(len(tokens))
        results.clear()
        threads = [
            threading.Thread(target=write, args=(start, t, clients[i % len(clients)], round_))
            for i, t in enumerate(tokens)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        best = max(tokens)
        assert results[best] is True
        assert clients[0].backend.kv.get(f"{{race-{round_}}}value") == str(best).encode()
        assert clients[0].fence(f"race-{round_}").highest() == best


def test_stale_lock_holder_is_rejected(backend: str, connect: Connect) -> None:
    a, b = connect(), connect()
    old = a.lock("job", ttl=TTL[backend], auto_renew=False)
    assert old.acquire()
    stale = old.fence
    new = b.lock("job", timeout=TTL[backend] + 5)
    assert new.acquire()  # after the old grant's TTL ran out
    assert new.fence > stale
    assert b.fence("job").write(new.fence, "{job}out", b"new holder")
    assert a.fence("job").write(stale, "{job}out", b"stale holder") is False
    assert a.backend.kv.get("{job}out") == b"new holder"
    new.release()


@pytest.mark.parametrize(
    ("token", "key", "value"),
    [
        (-1, "k", b"v"),
        (2**63, "k", b"v"),
        (True, "k", b"v"),
        ("5", "k", b"v"),
        (5, "", b"v"),
        (5, None, b"v"),
        (5, "k", "not bytes"),
        (5, "k", None),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(
    client: dcoord.Client, token: object, key: object, value: object
) -> None:
    guard = client.fence("account")
    with pytest.raises(dcoord.ConfigError):
        guard.write(token, key, value)  # type: ignore[arg-type]
    assert guard.highest() is None
    assert client.backend.kv.scan("") == {}
