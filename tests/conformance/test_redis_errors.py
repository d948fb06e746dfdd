"""Redis error replies become typed dcoord errors at the backend boundary, on a real server.

Each test owns its server (``server_factory``): it changes ACLs, memory limits,
replication and script settings that other tests must not see.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import dcoord
from dcoord.backends.redis import RedisBackend
from tests.servers import HOST, Server

PASSWORD = "app1-secret"
# A script that runs until SCRIPT KILL: it writes nothing, so it may be killed.
BUSY_LOOP = "local i = 0 while true do i = i + 1 end"


@pytest.fixture
def server(server_factory: Callable[..., Server]) -> Server:
    return server_factory("redis", persistent=False)


@pytest.fixture
def admin(server: Server) -> Iterator[redis.Redis]:
    client = redis.Redis(host=HOST, port=server.port)
    yield client
    client.close()


@pytest.fixture
def connect(
    server: Server, namespace: str, dcoord_connect: Callable[..., dcoord.Client]
) -> Iterator[Callable[..., dcoord.Client]]:
    """``connect(user=None, password=None, **options)``: a client of the test's server."""
    clients: list[dcoord.Client] = []

    def make(user: str | None = None, password: str | None = None, **options: Any) -> dcoord.Client:
        auth = f"{user}:{password}@" if user else ""
        options.setdefault("namespace", namespace)
        client = dcoord_connect(f"redis://{auth}{HOST}:{server.port}/0", **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def backend_of(client: dcoord.Client) -> RedisBackend:
    backend = client.backend
    assert isinstance(backend, RedisBackend)
    return backend


def add_user(admin: redis.Redis, name: str, *rules: str) -> None:
    admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{PASSWORD}", *rules)


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# -- NOPERM ---------------------------------------------------------------------------


def test_keys_outside_the_acl_are_permission_denied_naming_the_operation(
    admin: redis.Redis, connect: Callable[..., dcoord.Client]
) -> None:
    add_user(admin, "app1", "~other:*", "&*", "+@all")
    client = connect("app1", PASSWORD, request_timeout=30)
    operations: dict[str, Callable[[], object]] = {
        "acquire lock 'orders'": lambda: client.lock("orders", ttl=5).acquire(timeout=0),
        "admit fence 3 for 'orders'": lambda: client.fence("orders").admit(3),
        "put 'k'": lambda: client.backend.kv.put("k", b"v"),
        "get 'k'": lambda: client.backend.kv.get("k"),
        "join 'm1' in group 'g'": lambda: client.group("g").join("m1"),
        "create transaction record 'tx1'": lambda: client.backend.txlog.create(
            "tx1", b"{}", time.time() + 60
        ),
    }
    for what, operation in operations.items():
        started = time.monotonic()
        with pytest.raises(dcoord.PermissionDenied) as info:
            operation()
        message = str(info.value)
        assert what in message and "app1" in message and "NOPERM" in message, message
        assert PASSWORD not in message
        assert isinstance(info.value.__cause__, redis.exceptions.NoPermissionError)
        assert time.monotonic() - started < 10, f"{what}: the denial was retried"
    assert admin.keys("*") == [], "a denied operation wrote something"


def test_a_user_without_info_or_client_setname_is_denied_on_connect(
    admin: redis.Redis, connect: Callable[..., dcoord.Client]
) -> None:
    for missing in ("info", "client|setname"):
        add_user(admin, "app1", "~*", "&*", "+@all", f"-{missing}")
        with pytest.raises(dcoord.PermissionDenied, match=f"'{missing}'") as info:
            connect("app1", PASSWORD, connect_timeout=20)
        assert "connect to redis" in str(info.value)
        assert PASSWORD not in str(info.value)
    add_user(admin, "app1", "~*", "&*", "+@all")  # negative control: all allowed
    assert connect("app1", PASSWORD).ping().kind == "redis"


def test_follower_denied_its_channel_logs_one_line_without_traceback(
    admin: redis.Redis,
    connect: Callable[..., dcoord.Client],
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    add_user(admin, "app1", f"~dcoord:{namespace}:*", "+@all")  # keys, but no channels
    client = connect("app1", PASSWORD)
    with (
        caplog.at_level(logging.DEBUG, logger="dcoord"),
        client.group("g").watch(lambda view: None),
    ):
        # Several rounds of the follower's backoff.
        wait_until(lambda: sum("following group" in r.getMessage() for r in caplog.records) >= 4)
    follows = [r for r in caplog.records if "following group" in r.getMessage()]
    assert not any(r.exc_info for r in follows), "a traceback was logged"
    assert "denied it to user 'app1': NOPERM" in follows[0].getMessage()
    loud = [r for r in follows if r.levelno >= logging.INFO]
    assert len(loud) == 1, [r.getMessage() for r in loud]


# -- credentials ----------------------------------------------------------------------


def test_wrong_credentials_fail_at_once_naming_the_user(
    admin: redis.Redis, connect: Callable[..., dcoord.Client]
) -> None:
    add_user(admin, "app1", "~*", "&*", "+@all")
    started = time.monotonic()
    with pytest.raises(dcoord.ConfigError) as info:
        connect("app1", "not-the-password", connect_timeout=30)
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"wrong credentials were retried for {elapsed:.1f} s"
    message = str(info.value)
    assert "'app1'" in message and "not-the-password" not in message, message
    assert connect("app1", PASSWORD).ping().kind == "redis"  # negative control


# -- transient replies: READONLY, BUSY --------------------------------------------------


def test_readonly_replica_is_unavailable_and_retried_writes_give_up(
    server_factory: Callable[..., Server],
    admin: redis.Redis,
    connect: Callable[..., dcoord.Client],
) -> None:
    client = connect(request_timeout=1)
    client.backend.kv.put("k", b"before")
    master = server_factory("redis", persistent=False)
    admin.replicaof(HOST, master.port)
    try:
        with pytest.raises(dcoord.BackendUnavailable) as info:
            client.backend.kv.delete("k")  # not retried
        assert "READONLY" in str(info.value)
        assert isinstance(info.value.__cause__, redis.ResponseError)
        with pytest.raises(dcoord.BackendUnavailable, match="gave up"):
            client.backend.kv.put("k", b"after")  # retried, then given up
        with pytest.raises(dcoord.BackendUnavailable):
            client.lock("L", ttl=5).acquire(timeout=0)
    finally:
        admin.replicaof("NO", "ONE")
    client.backend.kv.put("k", b"after")  # negative control: a master again
    assert client.backend.kv.get("k") == b"after"


def test_primary_short_of_replicas_is_unavailable_not_an_error(
    admin: redis.Redis, connect: Callable[..., dcoord.Client]
) -> None:
    """min-replicas-to-write with its replicas gone (a failover under way, a network cut):
    NOREPLICAS says "later", like READONLY, so a retried write waits for them."""
    client = connect(request_timeout=1)
    admin.config_set("min-replicas-to-write", 1)
    try:
        with pytest.raises(dcoord.BackendUnavailable) as info:
            client.backend.kv.delete("k")
        assert "NOREPLICAS" in str(info.value)
        with pytest.raises(dcoord.BackendUnavailable, match="gave up"):
            client.backend.kv.put("k", b"after")  # retried, then given up
    finally:
        admin.config_set("min-replicas-to-write", 0)
    client.backend.kv.put("k", b"after")  # negative control: enough replicas again
    assert client.backend.kv.get("k") == b"after"


class BusyScript:
    """A script that keeps the test's server busy from ``start()`` until ``kill()``."""

    def __init__(self, server: Server, admin: redis.Redis) -> None:
        self._admin = admin
        self._runner = redis.Redis(host=HOST, port=server.port)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(redis.ResponseError):  # killed by SCRIPT KILL
            self._runner.eval(BUSY_LOOP, 0)

    def _answers_busy(self) -> bool:
        try:
            self._admin.ping()
        except redis.ResponseError as exc:
            return str(exc).startswith("BUSY")
        return False

    def start(self) -> None:
        self._admin.config_set("busy-reply-threshold", 50)
        self._thread.start()
        wait_until(self._answers_busy)

    def kill(self) -> None:
        with contextlib.suppress(redis.ResponseError):  # NOTBUSY: already killed
            self._admin.script_kill()
        self._thread.join(timeout=20)

    def close(self) -> None:
        if self._thread.is_alive():
            self.kill()
        self._runner.close()


@pytest.fixture
def busy(server: Server, admin: redis.Redis) -> Iterator[BusyScript]:
    script = BusyScript(server, admin)
    yield script
    script.close()


def test_busy_server_is_unavailable_without_retry_and_retried_until_it_answers(
    connect: Callable[..., dcoord.Client], busy: BusyScript
) -> None:
    client = connect(request_timeout=30)
    backend = backend_of(client)
    busy.start()
    started = time.monotonic()
    with pytest.raises(dcoord.BackendUnavailable, match="BUSY"):
        client.backend.kv.delete("k")
    assert time.monotonic() - started < 10, "a call without retry was retried"

    failed = threading.Event()
    attempts = 0

    def get() -> object:
        nonlocal attempts
        attempts += 1
        try:
            return backend.redis.get("dcoord:absent")
        except redis.ResponseError:
            failed.set()
            raise

    killer = threading.Thread(target=lambda: (failed.wait(20), busy.kill()))
    killer.start()
    assert backend.call(get, what="get while busy", retry=True) is None
    killer.join()
    assert attempts >= 2


# -- permanent replies: OOM, anything else ------------------------------------------------


def test_out_of_memory_is_a_backend_error_and_never_retried(
    admin: redis.Redis, connect: Callable[..., dcoord.Client]
) -> None:
    client = connect(request_timeout=30)
    backend = backend_of(client)
    admin.config_set("maxmemory", 1)
    try:
        attempts = 0

        def put() -> object:
            nonlocal attempts
            attempts += 1
            return backend.redis.set("dcoord:x", b"v")

        with pytest.raises(dcoord.BackendError, match="OOM command not allowed") as info:
            backend.call(put, what="put x", retry=True)
        assert attempts == 1
        assert not isinstance(info.value, dcoord.PermissionDenied)
        with pytest.raises(dcoord.BackendError, match="OOM"):
            client.backend.kv.put("k", b"v")
        with pytest.raises(dcoord.BackendError, match="OOM"):
            client.lock("L", ttl=5).acquire(timeout=0)
    finally:
        admin.config_set("maxmemory", 0)
    client.backend.kv.put("k", b"v")  # negative control


def test_other_error_replies_are_backend_errors_quoting_the_reply(
    connect: Callable[..., dcoord.Client],
) -> None:
    backend = backend_of(connect())
    with pytest.raises(dcoord.BackendError, match="ERR unknown command 'NOSUCHCOMMAND'"):
        backend.call(lambda: backend.redis.execute_command("NOSUCHCOMMAND"), what="probe")


def test_nested_calls_do_not_wrap_the_inner_error_again(
    admin: redis.Redis, connect: Callable[..., dcoord.Client]
) -> None:
    add_user(admin, "app1", "~other:*", "+@all")
    backend = backend_of(connect("app1", PASSWORD))
    inner_errors: list[BaseException] = []

    def inner() -> object:
        try:
            return backend.call(lambda: backend.redis.get("dcoord:x"), what="inner read")
        except BaseException as exc:
            inner_errors.append(exc)
            raise

    with pytest.raises(dcoord.PermissionDenied) as info:
        backend.call(inner, what="outer read", retry=True)
    assert inner_errors == [info.value]  # the same error, raised once, not retried
    assert "outer" not in str(info.value)
