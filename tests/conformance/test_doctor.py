"""``dcoord doctor`` and ``dcoord status`` against real servers (and memory)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

import dcoord
from dcoord.cli import main
from dcoord.cli.status import REDRAW
from dcoord.config import settings_from
from tests.servers import Server

ServerFactory = Callable[..., Server]


def doctor(url: str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, Any]]:
    """Run ``dcoord doctor URL --json``: the exit code and the checks by name."""
    code = main(["doctor", url, "--json", *extra])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    return code, checks


def test_doctor_passes_a_well_configured_server(
    backend_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, checks = doctor(backend_url, capsys)
    assert code == 0, checks
    assert {c["status"] for c in checks.values()} <= {"pass", "info"}
    assert {"server", "round trip", "clock offset"} <= set(checks)
    main(["doctor", backend_url])
    out = capsys.readouterr().out
    assert "all checks passed" in out and "[ok  ] server" in out


def test_doctor_leaves_nothing_behind(
    real_backend_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert doctor(real_backend_url, capsys, "--namespace", namespace)[0] == 0
    with dcoord.connect(real_backend_url, namespace=namespace) as client:
        backend: Any = client.backend
        if client.backend.kind == "redis":
            left = list(backend.redis.scan_iter(match=f"{backend.prefix}*"))
        else:
            left = list(backend.etcd.get_prefix(backend.prefix))
        assert left == []


def test_doctor_fails_appendonly_no(
    server_factory: ServerFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = server_factory("redis", persistent=False)
    code, checks = doctor(server.url, capsys)
    assert code == 1
    assert checks["persistence"]["status"] == "fail"
    assert "appendonly no" in checks["persistence"]["detail"]
    assert "appendonly yes" in checks["persistence"]["hint"]
    assert checks["maxmemory-policy"]["status"] == "pass"  # only the broken check fails


def test_doctor_fails_an_evicting_server(
    server_factory: ServerFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = server_factory("redis")
    assert doctor(server.url, capsys)[0] == 0  # negative control: the same server, unchanged
    with redis.Redis(port=server.port) as admin:
        admin.config_set("maxmemory-policy", "allkeys-lru")
    code, checks = doctor(server.url, capsys)
    assert code == 1
    assert checks["maxmemory-policy"]["status"] == "fail"
    assert "allkeys-lru" in checks["maxmemory-policy"]["detail"]
    assert "noeviction" in checks["maxmemory-policy"]["hint"]


def test_doctor_reports_each_refused_command_and_open_access(
    server_factory: ServerFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = server_factory("redis")
    with redis.Redis(port=server.port) as admin:
        # May do everything but publish; the default user stays enabled without a password.
        admin.execute_command(
            "ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all", "-publish"
        )
        url = f"redis://app:s3cret@127.0.0.1:{server.port}"
        code, checks = doctor(url, capsys)
        assert code == 1
        permissions = checks["permissions"]
        assert permissions["status"] == "fail"
        assert "PUBLISH" in permissions["detail"] and "SET:" not in permissions["detail"]
        assert "s3cret" not in json.dumps(checks)
        assert checks["open access"]["status"] == "fail"
        assert "default" in checks["open access"]["hint"]
        # Fixed: publish allowed, default user off.
        admin.execute_command("ACL", "SETUSER", "app", "+publish")
        admin.execute_command("ACL", "SETUSER", "default", "off")
        code, checks = doctor(url, capsys)
        assert checks["permissions"]["status"] == "pass"
        assert checks["open access"]["status"] == "pass"
        assert code == 0, checks


def test_doctor_fails_a_ttl_below_etcds_minimum_lease(
    servers: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = servers.url("etcd")
    code, checks = doctor(url, capsys, "--ttl", "1")
    assert code == 1
    assert checks["round trip"]["status"] == "fail"
    assert "ttl >= 2" in checks["round trip"]["hint"]
    assert checks["clock offset"]["status"] == "pass"  # from the HTTP Date header
    # One member, or three with DCOORD_TEST_TOPOLOGY=etcd3: as many as the URL names.
    members = len(settings_from(url).hosts)
    assert f"{members} member(s)" in checks["cluster health"]["detail"]


def test_status_shows_locks_groups_and_transactions(
    connect: Callable[..., dcoord.Client],
    backend_url: str,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = connect(label="status-test")
    member = client.group("workers").join("w1", ttl=20)
    try:
        with client.lock("orders/42", ttl=20) as lock:
            args = ["status", "--url", backend_url, "--namespace", namespace]
            assert main(args) == 0
            out = capsys.readouterr().out
            assert f"namespace  {namespace}" in out
            assert "orders/42" in out and "status-test" in out and str(lock.fence) in out
            assert "workers  1 member(s)" in out and "w1" in out
            assert "0 unfinished transaction(s)" in out
            assert main([*args, "--watch", "--count", "2", "--interval", "0.01"]) == 0
            screens = capsys.readouterr().out.split(REDRAW)
            assert len(screens) == 3 and screens[0] == "" and "orders/42" in screens[2]
    finally:
        member.leave()


def test_tx_list_puts_stuck_transactions_first(
    client: dcoord.Client, backend_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from dcoord import txlog
    from dcoord.txlog import TxRecord, TxState

    now = client.backend.txlog.now() or time.time()
    records = [
        TxRecord("a-done", TxState.COMMITTED, ("p",), created=now - 50, deadline=now - 40),
        TxRecord("b-open", TxState.STARTED, ("p",), created=now - 30, deadline=now + 600),
        TxRecord("c-stuck", TxState.STARTED, ("p",), created=now - 10, deadline=now - 5),
    ]
    for record in records:
        assert client.backend.txlog.create(record.txid, txlog.encode(record), record.deadline)
    assert main(["tx", "list", "--all", "--url", backend_url, "--namespace", namespace]) == 0
    lines = capsys.readouterr().out.splitlines()[1:4]
    assert [line.split()[0] for line in lines] == ["c-stuck", "b-open", "a-done"]
    assert "stuck" in lines[0] and "stuck" not in lines[1]


def test_doctor_checks_etcd_rbac_per_namespace(
    server_factory: ServerFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conformance.test_etcd_leases import enable_auth

    server = server_factory("etcd")
    enable_auth(server)  # user app may read and write /dcoord/ok/ only
    url = f"etcd://app:s3cret-pw@127.0.0.1:{server.port}"
    code, checks = doctor(url, capsys, "--namespace", "ok")
    assert checks["permissions"]["status"] == "pass", checks
    assert checks["open access"]["status"] == "pass"  # auth is on: anonymous is refused
    assert code == 0, checks
    code, checks = doctor(url, capsys, "--namespace", "other")
    assert code == 1
    refused = checks["permissions"]["detail"]
    assert "put:" in refused and "delete:" in refused and "s3cret-pw" not in refused
    assert "/dcoord/other/" in checks["permissions"]["hint"]


@pytest.mark.parametrize("kind", ["redis", "etcd"])
def test_doctor_fails_a_clock_offset_beyond_the_ttl_share(servers: Any, kind: str) -> None:
    """Redis tells its clock with TIME; etcd only in the Date header of its HTTP answers."""
    from dcoord.doctor import run_checks

    with dcoord.connect(servers.url(kind)) as client:

        def clock_offset(skew: float) -> dict[str, str]:
            checks = run_checks(client, 30.0, clock=lambda: time.time() + skew)
            return next(c.to_json() for c in checks if c.name == "clock offset")

        assert clock_offset(0.0)["status"] == "pass"  # negative control: the real clock
        ahead = clock_offset(5.0)
        assert ahead["status"] == "fail"
        found = re.search(r"= ([+-][0-9.]+) ms \(\+/- ([0-9.]+) ms\)", ahead["detail"])
        assert found, ahead["detail"]
        offset, error = float(found[1]), float(found[2])
        assert abs(offset + 5000) <= error + 100, ahead["detail"]  # this clock is 5 s ahead
        assert "NTP" in ahead["hint"]


def test_doctor_checks_replication(
    server_factory: ServerFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    primary, replica = server_factory("redis"), server_factory("redis")
    with redis.Redis(port=primary.port) as admin, redis.Redis(port=replica.port) as follower:
        assert doctor(primary.url, capsys)[1]["replication"]["status"] == "info"
        follower.execute_command("REPLICAOF", "127.0.0.1", str(primary.port))
        deadline = time.monotonic() + 30
        while admin.info("replication")["connected_slaves"] < 1:
            assert time.monotonic() < deadline, "the replica never connected"
            time.sleep(0.05)
        code, checks = doctor(primary.url, capsys)
        assert code == 1 and checks["replication"]["status"] == "fail"
        assert "min-replicas-to-write 0" in checks["replication"]["detail"]
        admin.config_set("min-replicas-to-write", 1)
        code, checks = doctor(primary.url, capsys)
        assert checks["replication"]["status"] == "pass", checks
        assert doctor(replica.url, capsys)[1]["replication"]["status"] == "fail"
