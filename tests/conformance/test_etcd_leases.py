"""etcd only: lease keep-alive pace and isolation, waiters on private leases, release
outcomes after lost replies, and the mapping of server errors to dcoord errors.

Every server is a real etcd. Faults are injected around it: a TCP proxy that loses one
request or one reply, a paused server, or a lease keep-alive stub (the client's side of
the wire) that fails or hangs for one chosen lease.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from pyetcd import exceptions as etcd_errors

import dcoord
from dcoord.backends.etcd import EtcdBackend
from tests.conformance.test_locks import wait_until
from tests.servers import HOST, ProcessServer, Server

Connect = Callable[..., dcoord.Client]


@pytest.fixture
def etcd_url(servers: Any) -> str:
    """The session's shared etcd."""
    return str(servers.url("etcd"))


@pytest.fixture
def etcd_connect(etcd_url: str, namespace: str) -> Iterator[Connect]:
    """``etcd_connect(url=None, **options)``: clients closed after the test."""
    clients: list[dcoord.Client] = []

    def make(url: str | None = None, **options: Any) -> dcoord.Client:
        options.setdefault("namespace", namespace)
        client = dcoord.connect(url or etcd_url, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def backend_of(client: dcoord.Client) -> EtcdBackend:
    backend = client.backend
    assert isinstance(backend, EtcdBackend)
    return backend


def lock_keys(client: dcoord.Client, name: str) -> list[tuple[bytes, int]]:
    """The queue keys of lock ``name`` (key, lease id), oldest first."""
    backend = backend_of(client)
    pairs = backend.etcd.get_prefix(f"{backend.prefix}lock/{name}/", sort_target="create")
    return [(meta.key, meta.lease_id) for _, meta in pairs]


def lease_of(lock: dcoord.Lock) -> Any:
    return lock._slot._lease  # type: ignore[attr-defined]


# -- 1. keep-alive pace ----------------------------------------------------------------


def test_a_shorter_lease_is_refreshed_at_its_own_pace(etcd_connect: Connect) -> None:
    a, b = etcd_connect(), etcd_connect()
    long = a.lock("long", ttl=30)
    assert long.acquire()
    short = a.lock("short", ttl=3)
    assert short.acquire()
    # Refreshed every ~10 s (the pace of the first lease), the 3 s lease would expire and
    # b would get the lock.
    assert b.lock("short", ttl=3).acquire(timeout=7) is False
    assert short.held
    short.release()
    long.release()


def test_a_lease_past_its_ttl_is_never_handed_out(etcd_connect: Connect) -> None:
    leases = backend_of(etcd_connect()).leases
    first = leases.lease(5)
    first.last_refreshed -= 10  # as after a pause of the process longer than the TTL
    second = leases.lease(5)
    assert second is not first
    assert first.lost.is_set()
    assert second.usable


def test_acquire_queues_again_on_a_fresh_lease_when_the_shared_one_is_gone(
    etcd_connect: Connect,
) -> None:
    client = etcd_connect()
    first = client.lock("first", ttl=30)
    assert first.acquire()
    lease = lease_of(first)
    # The server drops the lease; the keep-alive (every 10 s) has not noticed yet.
    backend_of(client).etcd.revoke_lease(lease.id)
    second = client.lock("second", ttl=30)
    assert second.acquire(timeout=5)
    assert lease_of(second).id != lease.id
    assert lease.lost.is_set()
    with pytest.raises(dcoord.LockNotOwned):
        first.extend()  # the lock on the dropped lease is lost
    second.release()


@pytest.mark.parametrize(
    "make",
    [
        lambda c: c.semaphore("sem", 2, ttl=30),
        lambda c: c.rwlock("rw", ttl=30).read(),
        lambda c: c.rwlock("rw", ttl=30).write(),
    ],
    ids=["semaphore", "read", "write"],
)
def test_a_queue_slot_queues_again_on_a_fresh_lease_when_the_shared_one_is_gone(
    etcd_connect: Connect, make: Callable[[dcoord.Client], dcoord.Lock]
) -> None:
    """Semaphores and read-write locks queue like locks: on a lease the server dropped,
    their put fails (nothing written) and they queue once more on a fresh lease."""
    client = etcd_connect()
    first = client.lock("first", ttl=30)
    assert first.acquire()
    lease = lease_of(first)
    backend_of(client).etcd.revoke_lease(lease.id)  # unnoticed by the keep-alive yet
    handle = make(client)
    assert handle.acquire(timeout=5)
    assert lease_of(handle).id != lease.id
    handle.release()


def test_a_member_joins_on_a_fresh_lease_when_the_shared_one_is_gone(
    etcd_connect: Connect,
) -> None:
    client = etcd_connect()
    group = client.group("g")
    first = group.join("m1", ttl=30)
    lease = backend_of(client).leases.lease(30)
    backend_of(client).etcd.revoke_lease(lease.id)
    second = group.join("m2", ttl=30)
    assert second.alive
    assert wait_until(lambda: not first.alive, 5)
    assert set(group.members()) == {"m2"}


# -- 2. renewal isolation ----------------------------------------------------------------


class FaultyLeaseStub:
    """The client's lease stub, with keep-alives of one lease failing or hanging."""

    def __init__(self, real: Any, victim: int, fault: str, stop: threading.Event) -> None:
        self._real = real
        self._victim = victim
        self._fault = fault
        self._stop = stop
        self.hit = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def LeaseKeepAlive(self, requests: Any, timeout: float, **kwargs: Any) -> Any:
        requests = list(requests)
        if self._victim != requests[0].ID:
            return self._real.LeaseKeepAlive(iter(requests), timeout, **kwargs)
        self.hit.set()
        if self._fault == "hangs":
            self._stop.wait(timeout)  # no answer until the request's own timeout
            raise etcd_errors.ConnectionTimeoutError()
        raise etcd_errors.PreconditionFailedError("injected: not a transient error")


@pytest.mark.parametrize("fault", ["raises", "hangs"])
def test_a_failing_or_hanging_refresh_does_not_delay_another_lease(
    etcd_connect: Connect, fault: str
) -> None:
    # A long request timeout: a hanging refresh would hold a sequential pass for 10 s.
    a, b = etcd_connect(request_timeout=10), etcd_connect()
    if fault == "hangs" and len(backend_of(a).settings.hosts) > 1:
        pytest.skip(
            "on a cluster the client leaves a hanging member for another, and the fault "
            "(one member's stub) with it; tests/faults/test_failover_etcd.py pauses members"
        )
    lost = threading.Event()
    victim = a.lock("victim", ttl=6, on_lost=lambda _lock: lost.set())
    assert victim.acquire()
    short = a.lock("short", ttl=3)
    assert short.acquire()
    etcd = backend_of(a).etcd
    stop = threading.Event()
    stub = FaultyLeaseStub(etcd.leasestub, lease_of(victim).id, fault, stop)
    etcd._stubs["leasestub"] = stub
    try:
        assert stub.hit.wait(5)
        # The 3 s lease is refreshed meanwhile: b cannot take its lock.
        assert b.lock("short", ttl=3).acquire(timeout=7) is False
        assert short.held
        # The victim's lease is declared lost by its own deadline, hanging refresh or not.
        assert lost.wait(2), "the victim's lock must be lost once its TTL passed"
        assert lease_of(victim).lost.is_set()
    finally:
        stop.set()
    short.release()


# -- 3. a waiter on a private lease --------------------------------------------------------


def test_a_waiter_whose_private_lease_is_gone_queues_again_at_once(
    etcd_connect: Connect,
) -> None:
    a, b = etcd_connect(), etcd_connect()
    holder = a.lock("res", ttl=30)
    assert holder.acquire()
    waiter = b.lock("res", ttl=3, auto_renew=False)
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(waiter.acquire(timeout=30)))
    thread.start()
    try:
        assert wait_until(lambda: len(lock_keys(a, "res")) == 2, 5)
        old_key, old_lease = lock_keys(a, "res")[1]
        backend_of(a).etcd.revoke_lease(old_lease)
        # The waiter learns it from its next keep-alive (within a third of its TTL) and
        # queues again, instead of watching the holder with its own key gone.
        assert wait_until(
            lambda: len(lock_keys(a, "res")) == 2 and lock_keys(a, "res")[1][0] != old_key, 5
        ), "the waiter must queue again once its lease is gone"
    finally:
        holder.release()
        thread.join(20)
    assert result == [True]
    waiter.release()


def test_a_waiter_keeps_its_place_through_a_failing_keep_alive(
    server_factory: Callable[..., Server], namespace: str
) -> None:
    server = server_factory("etcd")
    a = dcoord.connect(server.url, namespace=namespace)
    b = dcoord.connect(server.url, namespace=namespace, request_timeout=1)
    try:
        holder = a.lock("res", ttl=30)
        assert holder.acquire()
        # Kept alive by its waiter every 5 s; valid for 15 s after the last keep-alive.
        waiter = b.lock("res", ttl=15, auto_renew=False)
        errors: list[BaseException] = []
        acquired = threading.Event()

        def wait() -> None:
            try:
                if waiter.acquire(timeout=60):
                    acquired.set()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=wait)
        thread.start()
        assert wait_until(lambda: len(lock_keys(a, "res")) == 2, 5)
        (key, _) = lock_keys(a, "res")[1]
        # Longer than a keep-alive period plus its 1 s timeout: at least one keep-alive
        # fails; shorter than the lease's TTL, so the waiter's place survives.
        server.pause()
        time.sleep(7)
        server.resume()
        holder.release()
        thread.join(30)
        assert errors == [], f"acquire failed instead of waiting on: {errors}"
        assert acquired.is_set()
        assert waiter.held and lock_keys(a, "res")[0][0] == key, "it kept its place"
        waiter.release()
    finally:
        server.resume()
        a.close()
        b.close()


# -- 4./5. lost requests and replies -------------------------------------------------------


class Proxy:
    """A TCP proxy to a real server that can lose the next request, or its reply.

    ``arm("request")``: the next bytes from the client are dropped with the connection,
    so the server never sees that request. ``arm("reply")``: they are forwarded, the
    server's answers are dropped, and the connection is cut a second later (the server
    has long executed the request by then).
    """

    def __init__(self, port: int) -> None:
        self._upstream = port
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        self._mode: str | None = None
        self._mutex = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.tripped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, mode: str) -> None:
        with self._mutex:
            self._mode = mode

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            _shut(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection((HOST, self._upstream))
            self._sockets += [client, server]
            losing = threading.Event()
            threading.Thread(target=self._up, args=(client, server, losing), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, losing), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, losing: threading.Event) -> None:
        while data := _recv(client):
            with self._mutex:
                mode, self._mode = self._mode, None
            if mode == "request":
                _cut(client, server)
                self.tripped.set()
                return
            if mode == "reply":
                losing.set()

                def cut() -> None:
                    _cut(client, server)
                    self.tripped.set()

                threading.Timer(1.0, cut).start()
            try:
                server.sendall(data)
            except OSError:
                return
        _cut(client, server)

    def _down(self, server: socket.socket, client: socket.socket, losing: threading.Event) -> None:
        while data := _recv(server):
            if losing.is_set():
                continue
            try:
                client.sendall(data)
            except OSError:
                return
        _cut(client, server)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _cut(*sockets: socket.socket) -> None:
    for sock in sockets:
        _shut(sock)


@pytest.fixture
def proxy(etcd_url: str) -> Iterator[Proxy]:
    port = int(etcd_url.rsplit(":", 1)[1])
    proxy = Proxy(port)
    yield proxy
    proxy.close()


@pytest.mark.parametrize("auto_renew", [True, False], ids=["shared-lease", "private-lease"])
def test_a_release_whose_reply_was_lost_reports_an_unknown_outcome(
    etcd_connect: Connect, proxy: Proxy, auto_renew: bool
) -> None:
    client = etcd_connect(f"etcd://{HOST}:{proxy.port}")
    observer = etcd_connect()
    # A 60 s TTL: no keep-alive within the test, so the release is the next request.
    lock = client.lock("res", ttl=60, auto_renew=auto_renew)
    assert lock.acquire()
    proxy.arm("reply")
    with pytest.raises(dcoord.BackendUnavailable, match="release outcome is unknown"):
        lock.release()
    assert proxy.tripped.is_set()
    assert lock_keys(observer, "res") == [], "the lost attempt did release it"


@pytest.mark.parametrize("auto_renew", [True, False], ids=["shared-lease", "private-lease"])
def test_a_release_retries_a_request_the_connection_lost(
    etcd_connect: Connect, proxy: Proxy, auto_renew: bool
) -> None:
    client = etcd_connect(f"etcd://{HOST}:{proxy.port}")
    observer = etcd_connect()
    lock = client.lock("res", ttl=60, auto_renew=auto_renew)
    assert lock.acquire()
    proxy.arm("request")
    lock.release()  # retried on a new connection: a true, known outcome
    assert proxy.tripped.is_set()
    assert lock_keys(observer, "res") == []
    # Negative control: a release that finds nothing at its first attempt is "not held".
    assert lock.acquire()
    (_, lease_id) = lock_keys(observer, "res")[0]
    backend_of(observer).etcd.revoke_lease(lease_id)
    with pytest.raises(dcoord.LockNotOwned):
        lock.release()


# -- 5. server errors ------------------------------------------------------------------------


def etcdctl(server: Server, *args: str) -> None:
    subprocess.run(
        ["etcdctl", f"--endpoints=http://{HOST}:{server.port}", *args],
        env={**os.environ, "ETCDCTL_API": "3"},
        check=True,
        capture_output=True,
    )


def enable_auth(server: Server) -> None:
    """Users root and ``app`` (password ``s3cret-pw``), app limited to namespace ``ok``."""
    etcdctl(server, "user", "add", "root:root-pw", "--interactive=false")
    etcdctl(server, "user", "add", "app:s3cret-pw", "--interactive=false")
    etcdctl(server, "role", "add", "app")
    etcdctl(server, "role", "grant-permission", "app", "--prefix=true", "readwrite", "/dcoord/ok/")
    etcdctl(server, "user", "grant-role", "app", "app")
    etcdctl(server, "auth", "enable")


def test_permission_denied_names_the_operation_never_the_password(
    server_factory: Callable[..., Server],
) -> None:
    server = server_factory("etcd")
    enable_auth(server)
    url = f"etcd://app:s3cret-pw@{HOST}:{server.port}"
    with dcoord.connect(url, namespace="ok") as allowed:
        allowed.backend.kv.put("k", b"v")  # the role's own prefix works
        with allowed.lock("res", ttl=5):
            pass
    with dcoord.connect(url, namespace="other") as denied:
        for what, operation in [
            ("put 'k'", lambda: denied.backend.kv.put("k", b"v")),
            ("get 'k'", lambda: denied.backend.kv.get("k")),
            ("acquire lock 'res'", lambda: denied.lock("res", ttl=5).acquire()),
        ]:
            with pytest.raises(dcoord.PermissionDenied, match=what) as caught:
                operation()
            assert "s3cret-pw" not in str(caught.value)
    with pytest.raises(dcoord.ConfigError, match="authentication failed") as bad:
        dcoord.connect(f"etcd://app:wrong-pw@{HOST}:{server.port}")
    assert "wrong-pw" not in str(bad.value)
    with pytest.raises(dcoord.ConfigError, match="'app' and no password"):
        dcoord.connect(f"etcd://app@{HOST}:{server.port}")


def test_any_other_server_error_is_a_backend_error_quoting_the_reply(
    etcd_connect: Connect,
) -> None:
    client = etcd_connect()
    # Over etcd's --max-request-bytes (1.5 MiB), under gRPC's own message limit.
    with pytest.raises(dcoord.BackendError, match="request is too large"):
        client.backend.kv.put("big", b"x" * (1800 * 1024))


def test_a_closed_client_raises_client_closed(etcd_connect: Connect) -> None:
    client = etcd_connect()
    backend = backend_of(client)
    subscription = backend.groups.subscribe("g")
    client.close()
    with pytest.raises(dcoord.ClientClosed):
        backend.kv.get("k")
    with pytest.raises(dcoord.ClientClosed):
        backend.leases.lease(5)
    with pytest.raises(dcoord.ClientClosed):
        backend.groups.read("g")
    subscription.close()  # its watch went with the client: nothing to do, nothing raised


class ShortTokenEtcd(ProcessServer):
    """An etcd whose auth tokens expire after 2 s without use."""

    def command(self, data_dir: str) -> list[str]:
        return [*super().command(data_dir), "--auth-token-ttl", "2"]


def test_an_expired_auth_token_is_renewed() -> None:
    server = ShortTokenEtcd("etcd")
    try:
        server.start()
        enable_auth(server)
        with dcoord.connect(f"etcd://app:s3cret-pw@{HOST}:{server.port}", namespace="ok") as c:
            c.backend.kv.put("k", b"v")
            time.sleep(4)  # no traffic for twice the token TTL: the server forgets the token
            assert c.backend.kv.get("k") == b"v"
            with c.lock("res", ttl=5):
                pass
    finally:
        server.stop()


class Reply(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A gRPC error reply as the server sends it (for replies no single test server
    produces on demand, such as a follower's "not leader")."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> None:
        return None

    def trailing_metadata(self) -> None:
        return None

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


def failing(replies: list[Reply]) -> Callable[[], str]:
    """A call that fails with each reply in turn (as pyetcd raises them), then answers."""

    def call() -> str:
        if replies:
            try:
                raise replies.pop(0)
            except grpc.RpcError:
                raise etcd_errors.PreconditionFailedError() from None
        return "answer"

    return call


def test_not_leader_is_retried_and_other_replies_are_backend_errors(
    etcd_connect: Connect,
) -> None:
    backend = backend_of(etcd_connect())
    not_leader = Reply(grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: not leader")
    changed = Reply(grpc.StatusCode.UNAVAILABLE, "etcdserver: leader changed")
    assert backend.call(failing([not_leader, changed]), what="read", retry=True) == "answer"
    with pytest.raises(dcoord.BackendUnavailable, match="not leader"):
        backend.call(failing([not_leader]), what="write")  # not safe to repeat
    other = Reply(grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: something else")
    # Raised at all means not retried: the retry would have got the answer.
    with pytest.raises(dcoord.BackendError, match="etcd answered: etcdserver: something else"):
        backend.call(failing([other]), what="read", retry=True)


def test_a_server_side_deadline_is_transient(etcd_connect: Connect) -> None:
    """etcd answers UNKNOWN "context deadline exceeded" when the request's deadline passed
    on the server (a member forwarding to a leader that just died): retried like the
    client's own deadline, never a BackendError."""
    backend = backend_of(etcd_connect())
    late = Reply(grpc.StatusCode.UNKNOWN, "context deadline exceeded")
    assert backend.call(failing([late]), what="read", retry=True) == "answer"
    with pytest.raises(dcoord.BackendUnavailable, match="context deadline exceeded"):
        backend.call(failing([late]), what="write")  # not safe to repeat


def test_the_watches_of_a_stream_given_up_end_with_an_error(etcd_connect: Connect) -> None:
    """A request that fails for want of an answer gives up its member's stream (pyetcd
    half-closes it, and on a hanging member it would stay silent forever): its watches
    must hear so, to watch again on the member in use; a new watch works at once."""
    client = etcd_connect()
    backend = backend_of(client)
    key = f"/dcoord/{client.namespace}/watched"
    heard: list[Any] = []
    ended = threading.Event()

    def on_response(response: Any) -> None:
        heard.append(response)
        if isinstance(response, BaseException):
            ended.set()

    backend.call(lambda: backend.etcd.add_watch_callback(key, on_response), what="watch")

    def no_answer(etcd: Any) -> None:
        raise Reply(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    with pytest.raises(dcoord.BackendUnavailable):
        backend.call(lambda: backend.rpc(no_answer), what="read")
    assert ended.wait(5), f"the watch never heard its stream was given up: {heard}"

    again = threading.Event()
    backend.call(lambda: backend.etcd.add_watch_callback(key, lambda _: again.set()), what="watch")
    backend.call(lambda: backend.etcd.put(key, "v"), what="put")
    assert again.wait(5)
