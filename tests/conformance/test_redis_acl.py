"""The Redis ACL rule docs/security.md gives for one namespace is enough, and confines.

A user with exactly that rule runs locks (contended: pub/sub), fences, a group and a
two-phase commit in its namespace, and is denied (with nothing written) in another.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import dcoord
from dcoord.cli import main
from dcoord.cli.acl import redis_acl_rule
from tests.participants import Voter
from tests.servers import HOST, ROOT, Server

NS = "app1"
PASSWORD = "app1-secret"


def documented_rule() -> list[str]:
    """The ``ACL SETUSER`` arguments ``dcoord acl redis app1`` prints (namespace app1, db
    0); docs/security.md shows the same line."""
    rule = redis_acl_rule(NS)
    line = " ".join(rule)
    assert line in (ROOT / "docs" / "security.md").read_text().splitlines(), line
    return rule[3:]


@pytest.fixture
def server(server_factory: Any) -> Server:
    server: Server = server_factory("redis", persistent=False)
    admin = redis.Redis(host=HOST, port=server.port)
    rule = [f">{PASSWORD}" if part == ">PASSWORD" else part for part in documented_rule()]
    assert f"~dcoord:{NS}:*" in rule and f"&dcoord:{NS}:*" in rule
    admin.execute_command("ACL", "SETUSER", "app1", "reset", *rule)
    admin.close()
    return server


@pytest.fixture
def admin(server: Server) -> Iterator[redis.Redis]:
    client = redis.Redis(host=HOST, port=server.port)
    yield client
    client.close()


@pytest.fixture
def connect(
    server: Server, dcoord_connect: Callable[..., dcoord.Client]
) -> Callable[[str], dcoord.Client]:
    """``connect(namespace)``: a client of the test's server as user app1."""

    def make(namespace: str) -> dcoord.Client:
        url = f"redis://app1:{PASSWORD}@{HOST}:{server.port}/0"
        return dcoord_connect(url, namespace=namespace)

    return make


def test_the_documented_rule_runs_every_primitive_in_its_namespace(
    server: Server, connect: Callable[[str], dcoord.Client]
) -> None:
    with connect(NS) as a, connect(NS) as b:
        # A contended lock: b waits on the release channel until a lets go.
        held = a.lock("orders", ttl=10)
        assert held.acquire(timeout=5)
        got: list[bool] = []
        waiter = threading.Thread(target=lambda: got.append(b.lock("orders").acquire(timeout=30)))
        waiter.start()
        fence = a.fence("orders")
        assert fence.admit(held.fence)
        assert fence.write(held.fence, "balance", b"10")
        assert fence.highest() == held.fence
        held.release()
        waiter.join()
        assert got == [True]

        group = a.group("workers")
        seen = threading.Event()
        with group.watch(lambda view: seen.set() if "w1" in view else None):
            member = b.group("workers").join("w1")
            assert seen.wait(10)
        assert set(group.members()) == {"w1"}
        member.leave()

        participant = Voter("p")
        with warnings.catch_warnings():
            # CONFIG GET is not in the rule: the log's durability cannot be checked.
            warnings.simplefilter("ignore", dcoord.DurabilityWarning)
            coordinator = a.coordinator(participants=[participant])
        with coordinator.transaction(timeout=10) as tx:
            tx.enlist("p", {"x": 1})
        assert participant.outcomes == {tx.txid: "committed"}


def test_the_rule_denies_other_namespaces_and_writes_nothing_there(
    server: Server, admin: redis.Redis, connect: Callable[[str], dcoord.Client]
) -> None:
    with connect("other") as client:
        for operation in (
            lambda: client.lock("orders", ttl=5).acquire(timeout=0),
            lambda: client.fence("orders").admit(1),
            lambda: client.group("workers").join("w1"),
            lambda: client.group("workers").ring(),
            lambda: client.backend.kv.put("k", b"v"),
            lambda: client.backend.txlog.create("tx1", b"{}", time.time() + 60),
        ):
            with pytest.raises(dcoord.PermissionDenied):
                operation()
    assert admin.keys("*") == []


def test_a_rule_short_of_a_command_is_denied_naming_it(
    server: Server, admin: redis.Redis, connect: Callable[[str], dcoord.Client]
) -> None:
    # Negative control: the first test would notice a command missing from the rule.
    admin.execute_command("ACL", "SETUSER", "app1", "-evalsha")
    with connect(NS) as client, pytest.raises(dcoord.PermissionDenied, match="'evalsha'"):
        client.lock("orders", ttl=5).acquire(timeout=0)


def test_a_database_other_than_0_needs_select(
    server: Server, admin: redis.Redis, dcoord_connect: Callable[..., dcoord.Client]
) -> None:
    url = f"redis://app1:{PASSWORD}@{HOST}:{server.port}/1"
    with pytest.raises(dcoord.PermissionDenied, match="'select'"):
        dcoord_connect(url, namespace=NS)
    admin.execute_command("ACL", "SETUSER", "app1", "+select")  # as docs/security.md says
    with dcoord_connect(url, namespace=NS) as client:
        assert client.fence("orders").admit(1)


def test_a_join_denied_the_channel_writes_nothing_and_can_join_later(
    server: Server, admin: redis.Redis, connect: Callable[[str], dcoord.Client]
) -> None:
    # Redis does not roll a script back: a join that wrote its member before PUBLISH was
    # refused left an id that could never join again ("already joined and alive").
    admin.execute_command("ACL", "SETUSER", "app1", "resetchannels")
    with connect(NS) as client:
        with pytest.raises(dcoord.PermissionDenied, match=r"(?i)publish"):
            client.group("workers").join("w1")
        assert admin.keys("*") == []
        admin.execute_command("ACL", "SETUSER", "app1", f"&dcoord:{NS}:*")
        member = client.group("workers").join("w1")
        assert set(client.group("workers").members()) == {"w1"}
        member.leave()


def test_a_release_denied_the_channel_keeps_the_lock(
    server: Server, admin: redis.Redis, connect: Callable[[str], dcoord.Client]
) -> None:
    with connect(NS) as client:
        lock = client.lock("orders", ttl=30)
        assert lock.acquire(timeout=0)
        keys = sorted(admin.keys("*"))
        values = [admin.get(key) for key in keys if admin.type(key) == b"string"]
        admin.execute_command("ACL", "SETUSER", "app1", "resetchannels")
        with pytest.raises(dcoord.PermissionDenied, match="publish"):
            lock.release()
        # Nothing changed: the lock is still the holder's, not deleted behind an error.
        assert sorted(admin.keys("*")) == keys
        assert [admin.get(key) for key in keys if admin.type(key) == b"string"] == values
        admin.execute_command("ACL", "SETUSER", "app1", f"&dcoord:{NS}:*")
        assert not client.lock("orders", ttl=5).acquire(timeout=0)


def test_dcoord_acl_redis_prints_the_verified_rule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["acl", "redis", NS]) == 0
    assert capsys.readouterr().out == " ".join(redis_acl_rule(NS)) + "\n"
    assert main(["acl", "redis", NS, "--database", "1"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(" +select")
    assert main(["acl", "redis", "bad/ns"]) == 2
    assert "'bad/ns'" in capsys.readouterr().err


def _finish(client: dcoord.Client) -> None:
    log = client.backend.txlog
    entry = log.get("tx1")
    assert entry is not None
    log.cas("tx1", entry, b'{"done": 1}', finished=True, retention=60, state="committed", created=1)


@pytest.mark.parametrize(
    ("missing", "setup", "operation"),
    [
        ("zadd", None, lambda c: c.backend.txlog.create("tx1", b"{}", time.time() + 60)),
        ("zrem", lambda c: c.backend.txlog.create("tx1", b"{}", time.time() + 60), _finish),
        ("del", lambda c: c.backend.kv.put("old", b"1"), lambda c: c.backend.kv.apply(
            {"new": b"2"}, deletes=["old"])),
    ],
    ids=["txlog create without zadd", "txlog finish without zrem", "kv apply without del"],
)  # fmt: skip
def test_a_script_denied_a_later_command_changes_nothing(
    server: Server,
    admin: redis.Redis,
    connect: Callable[[str], dcoord.Client],
    missing: str,
    setup: Callable[[dcoord.Client], object] | None,
    operation: Callable[[dcoord.Client], object],
) -> None:
    # A record written without its index entry would be one no recovery finds; a
    # finished record still indexed, or puts without their deletes, half an update.
    with connect(NS) as client:
        if setup is not None:
            setup(client)
        before = {key: admin.dump(key) for key in admin.keys("*")}
        admin.execute_command("ACL", "SETUSER", "app1", f"-{missing}")
        with pytest.raises(dcoord.PermissionDenied, match=missing.upper()):
            operation(client)
        assert {key: admin.dump(key) for key in admin.keys("*")} == before
