"""The etcd role ``dcoord acl etcd NS`` prints is enough for every primitive, and confines.

The server runs with TLS (client certificates required) and auth; the user is created by
running exactly the ``etcdctl`` commands the CLI prints. In its namespace the user runs
locks (contended), fences, a group with a watch and a live ring, and a two-phase commit;
in another namespace every operation is ``PermissionDenied``, nothing is written and
nothing is logged above INFO, with no traceback.
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import pytest

import dcoord
from dcoord.backends.etcd.locks import EtcdLocks, EtcdLockSlot
from dcoord.cli import main
from dcoord.cli.acl import etcd_rbac_commands
from tests.participants import Voter
from tests.servers import Certificates, Server

NS = "app1"
USER_PASSWORD = "app1-etcd-secret"
ADMIN_PASSWORD = "root-etcd-secret"


@pytest.fixture
def server(server_factory: Callable[..., Server], certificates: Certificates) -> Server:
    return server_factory("etcd", persistent=False, tls=certificates, password=ADMIN_PASSWORD)


@pytest.fixture
def url(server: Server) -> str:
    """The URL of user app1, made by the commands ``dcoord acl etcd app1`` prints."""
    return server.confine(NS, NS, USER_PASSWORD)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Every dcoord log record, DEBUG and up."""
    captured: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = captured.append  # type: ignore[method-assign]
    logger = logging.getLogger("dcoord")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield captured
    logger.removeHandler(handler)
    logger.setLevel(level)


def keys_under(server: Server, prefix: str) -> list[str]:
    return server.etcdctl("get", "--prefix", "--keys-only", prefix).split()


def lease_count(server: Server) -> int:
    return int(server.etcdctl("lease", "list").split()[1])  # "found N leases"


def test_the_role_runs_every_primitive_in_its_namespace(url: str) -> None:
    with dcoord.connect(url, namespace=NS) as a, dcoord.connect(url, namespace=NS) as b:
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
            ring = group.ring()
            member = b.group("workers").join("w1")
            assert seen.wait(10)
            assert ring.wait_for(lambda live: "w1" in live.members, timeout=10)
            assert ring.node_for("key") == "w1"
            ring.close()
        member.leave()

        participant = Voter("p")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dcoord.DurabilityWarning)
            coordinator = a.coordinator(participants=[participant])
        with coordinator.transaction(timeout=10) as tx:
            tx.enlist("p", {"x": 1})
        assert participant.outcomes == {tx.txid: "committed"}


def test_the_role_denies_other_namespaces_writes_nothing_and_logs_no_traceback(
    server: Server, url: str, records: list[logging.LogRecord]
) -> None:
    with dcoord.connect(url, namespace="other") as client:
        for operation in (
            lambda: client.lock("orders", ttl=5).acquire(timeout=0),
            lambda: client.fence("orders").admit(1),
            lambda: client.group("workers").join("w1"),
            lambda: client.group("workers").members(),
            lambda: client.group("workers").ring(),
            lambda: client.backend.kv.put("k", b"v"),
            lambda: client.backend.txlog.create("tx1", b"{}", time.time() + 60),
        ):
            with pytest.raises(dcoord.PermissionDenied, match="'app1'"):
                operation()
        # A lock without renewal has a private lease: revoked, not left to its TTL.
        leases = lease_count(server)
        with pytest.raises(dcoord.PermissionDenied):
            client.lock("orders", ttl=5, auto_renew=False).acquire(timeout=0)
        assert lease_count(server) == leases
    assert keys_under(server, "/dcoord/other/") == []
    loud = [r for r in records if r.levelno > logging.INFO or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]


def test_an_acquire_error_is_not_hidden_by_its_cleanup(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cleanup of a failed acquire used to raise over the acquire's own error.
    def failing_wait(self: EtcdLockSlot, deadline: float | None, bound: float | None) -> str:
        raise dcoord.BackendUnavailable("the acquire's own error")

    def failing_forget(self: EtcdLocks, *args: object, **options: object) -> None:
        raise RuntimeError("scheduler is closed")

    with dcoord.connect(url, namespace=NS) as holder, dcoord.connect(url, namespace=NS) as other:
        assert holder.lock("orders", ttl=10).acquire(timeout=5)
        monkeypatch.setattr(EtcdLockSlot, "_wait", failing_wait)
        monkeypatch.setattr(EtcdLocks, "forget", failing_forget)
        with pytest.raises(dcoord.BackendUnavailable, match="the acquire's own error"):
            other.lock("orders", ttl=10).acquire(timeout=5)


def test_dcoord_acl_etcd_prints_the_commands_these_tests_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["acl", "etcd", NS]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [shlex.join(command) for command in etcd_rbac_commands(NS)]
    assert "etcdctl role grant-permission dcoord-app1 readwrite /dcoord/app1/ --prefix" in printed
