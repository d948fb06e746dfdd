"""Members in real processes against real Redis and etcd: kill, stop, leave, server restart.

Each member runs in a child process (this file run as a script). The test process holds a
live ring and a watch, and checks that they follow what happens to the members, without
restarting, within the member's TTL. The checker is shown to catch a ring that does not
follow (negative control).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dcoord
from dcoord.membership import GroupView
from tests.faults.child import LineReader, line_writer

# etcd grants no lease under ~2 s; Redis takes TTLs to the millisecond.
TTL = {"redis": 1.0, "etcd": 2.0}
# How late after its TTL a dead member may still be seen: the follower's wake-up, etcd's
# lease checks (every 500 ms) and a loaded 2-core machine.
SLACK = 1.5


class MemberProcess:
    """A child process that joins one member and obeys ``leave`` / ``exit`` on stdin."""

    def __init__(self, url: str, namespace: str, group: str, member_id: str, ttl: float):
        self.member_id = member_id
        self.proc = subprocess.Popen(
            [sys.executable, __file__, url, namespace, group, member_id, str(ttl)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        self._lines = LineReader(self.proc.stdout)

    def expect(self, prefix: str, timeout: float = 15.0) -> str:
        found = self._lines.find(prefix, timeout)
        assert found is not None, (
            f"{self.member_id}: no {prefix!r} within {timeout} s: {self._lines.lines}"
        )
        return found

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def spawn(real_backend_url: str, namespace: str) -> Iterator[Callable[..., MemberProcess]]:
    """``spawn(member_id, group="g", ttl=..., url=...)``: a member process, killed afterwards."""
    started: list[MemberProcess] = []

    def make(member_id: str, *, ttl: float, group: str = "g", url: str = "") -> MemberProcess:
        process = MemberProcess(url or real_backend_url, namespace, group, member_id, ttl)
        started.append(process)
        process.expect("JOINED")
        return process

    yield make
    for process in started:
        process.stop()


@pytest.fixture
def observer(real_backend_url: str, namespace: str) -> Iterator[dcoord.Client]:
    with dcoord.connect(real_backend_url, namespace=namespace) as client:
        yield client


def reflects(ring: dcoord.LiveRing, predicate: Callable[[set[str]], bool], timeout: float) -> bool:
    """The checker: does the ring's member set satisfy ``predicate`` within ``timeout``?"""
    return ring.wait_for(lambda r: predicate(set(r.members)), timeout)


@pytest.mark.slow
def test_killed_member_disappears_within_ttl_and_a_leaving_one_at_once(
    real_backend: str, spawn: Callable[..., MemberProcess], observer: dcoord.Client
) -> None:
    ttl = TTL[real_backend]
    ring = observer.group("g").ring()
    views: list[GroupView] = []
    observer.group("g").watch(views.append)
    victim = spawn("victim", ttl=ttl)
    leaver = spawn("leaver", ttl=ttl)
    assert reflects(ring, lambda m: m == {"victim", "leaver"}, 5)

    victim.signal(signal.SIGKILL)
    killed = time.monotonic()
    assert reflects(ring, lambda m: "victim" not in m, ttl + SLACK + 2)
    gone_after = time.monotonic() - killed
    assert gone_after <= ttl + SLACK, f"killed member seen for {gone_after:.2f} s (ttl {ttl})"
    assert set(ring.members) == {"leaver"}

    leaver.send("leave")
    leaver.expect("LEFT")
    left = time.monotonic()
    assert reflects(ring, lambda m: m == set(), 5)
    assert time.monotonic() - left < 0.5, "a leave must show at once, not after the TTL"
    with pytest.raises(dcoord.NoMembers):
        ring.node_for("k")
    assert watched(views, set(), 2), views
    seen = [set(v) for v in views]
    # Level-triggered: states may be skipped, but the dead member never comes back.
    gone = next(
        i for i, m in enumerate(seen) if i > 0 and "victim" in seen[i - 1] and "victim" not in m
    )
    assert all("victim" not in m for m in seen[gone:]), seen


@pytest.mark.slow
def test_stopped_member_process_is_dropped_and_learns_it_was_lost(
    real_backend: str, spawn: Callable[..., MemberProcess], observer: dcoord.Client
) -> None:
    ttl = TTL[real_backend]
    ring = observer.group("g").ring()
    frozen = spawn("frozen", ttl=ttl)
    assert reflects(ring, lambda m: "frozen" in m, 5)
    frozen.signal(signal.SIGSTOP)
    try:
        assert reflects(ring, lambda m: "frozen" not in m, ttl + SLACK + 2)
    finally:
        frozen.signal(signal.SIGCONT)
    line = frozen.expect("LOST", timeout=ttl + 10)
    assert len(line) > len("LOST "), "the loss carries a reason"
    # Running again, the process must not have re-joined behind the application's back.
    frozen.send("status")
    assert frozen.expect("STATUS") == "STATUS alive=False"
    assert "frozen" not in observer.group("g").members()
    assert "frozen" not in ring


def test_checker_catches_a_ring_that_does_not_follow(
    real_backend: str, spawn: Callable[..., MemberProcess], observer: dcoord.Client
) -> None:
    """Negative control: a ring that stopped following keeps the killed member."""
    ttl = TTL[real_backend]
    stale = observer.group("g").ring()
    live = observer.group("g").ring()
    victim = spawn("victim", ttl=ttl)
    assert reflects(stale, lambda m: "victim" in m, 5)
    stale.close()  # the broken variant: it no longer follows the group
    victim.signal(signal.SIGKILL)
    assert reflects(live, lambda m: "victim" not in m, ttl + SLACK + 2)
    assert not reflects(stale, lambda m: "victim" not in m, 0.5)


def test_checker_catches_a_follower_that_ignores_expiries(
    servers: Any, namespace: str, monkeypatch: Any
) -> None:
    """Negative control on Redis: nobody reads the group, so only the follower's wake-up at
    the earliest expiry (its reads', or a joined member's TTL) prunes a killed member;
    without it the check must fail."""
    url = servers.url("redis")
    ttl = TTL["redis"]
    with dcoord.connect(url, namespace=namespace) as observer:
        store = observer.backend.groups
        read, subscribe = store.read, store.subscribe

        def read_without_expiry(group: str) -> Any:
            return dataclasses.replace(read(group), next_expiry=None)

        def subscribe_without_expiry(group: str) -> Any:
            subscription = subscribe(group)
            wait = subscription.wait

            def wait_without_expiry(timeout: float) -> Any:
                changes = wait(timeout)
                return changes and [dataclasses.replace(c, ttl=None) for c in changes]

            subscription.wait = wait_without_expiry
            return subscription

        # The broken variant:
        monkeypatch.setattr(store, "read", read_without_expiry)
        monkeypatch.setattr(store, "subscribe", subscribe_without_expiry)
        ring = observer.group("g").ring()
        victim = MemberProcess(url, namespace, "g", "victim", ttl)
        try:
            victim.expect("JOINED")
            assert reflects(ring, lambda m: "victim" in m, 5)
            victim.signal(signal.SIGKILL)
            assert not reflects(ring, lambda m: "victim" not in m, ttl + SLACK)
        finally:
            victim.stop()


@pytest.mark.slow
def test_live_ring_and_watch_survive_a_server_restart(
    real_backend: str, server_factory: Callable[..., Any], namespace: str
) -> None:
    server = server_factory(real_backend, persistent=True)
    with (
        dcoord.connect(server.url, namespace=namespace) as observer,
        dcoord.connect(server.url, namespace=namespace) as members,
    ):
        ring = observer.group("g").ring()
        views: list[GroupView] = []
        observer.group("g").watch(views.append)
        members.group("g").join("before", ttl=30)
        assert reflects(ring, lambda m: m == {"before"}, 5)

        server.restart()

        # Changes after the restart reach the ring and the watch made before it. Both are
        # level-triggered: a state that lasted no longer than their reconnect may be
        # skipped, so each state here is held until both have seen it.
        after = dcoord.connect(server.url, namespace=namespace)
        try:
            joined = after.group("g").join("after", ttl=30)
            assert reflects(ring, lambda m: m == {"before", "after"}, 15), ring
            assert watched(views, {"before", "after"}, 5), views
            joined.leave()
            assert reflects(ring, lambda m: m == {"before"}, 5), ring
            assert watched(views, {"before"}, 5), views
        finally:
            after.close()


@pytest.mark.slow
def test_member_is_lost_when_heart_beats_fail_past_its_ttl(
    real_backend: str, server_factory: Callable[..., Any], namespace: str
) -> None:
    ttl = TTL[real_backend]
    server = server_factory(real_backend, persistent=True)
    lost = threading.Event()
    with dcoord.connect(server.url, namespace=namespace, request_timeout=0.5) as client:
        member = client.group("g").join("m", ttl=ttl, on_lost=lambda m: lost.set())
        server.pause()
        try:
            paused = time.monotonic()
            assert lost.wait(ttl + 5), "on_lost not called while the server was unreachable"
            assert time.monotonic() - paused >= ttl * 0.5
            assert not member.alive
            assert member.lost_reason
        finally:
            server.resume()
        # The server answers again: the member stays lost, and the group does not list it.
        deadline = time.monotonic() + ttl + 5
        while "m" in client.group("g").members() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "m" not in client.group("g").members()
        assert not member.alive


def test_member_is_lost_when_redis_refuses_its_heart_beats(
    server_factory: Callable[..., Any], namespace: str
) -> None:
    """A Redis out of memory answers, but refuses every write: the member is lost after
    its TTL like when the server is unreachable, and a live ring keeps its last set."""
    server = server_factory("redis", persistent=False)
    lost = threading.Event()
    with dcoord.connect(server.url, namespace=namespace) as client:
        ring = client.group("g").ring()
        member = client.group("g").join("m", ttl=0.6, on_lost=lambda m: lost.set())
        assert reflects(ring, lambda m: m == {"m"}, 5)
        client.backend.redis.config_set("maxmemory", 1)  # type: ignore[attr-defined]
        try:
            assert lost.wait(5), "heart-beats were refused, yet the member was not lost"
            assert not member.alive
            assert "maxmemory" in (member.lost_reason or "")
            assert set(ring.members) == {"m"}  # nothing newer could be read
        finally:
            client.backend.redis.config_set("maxmemory", 0)  # type: ignore[attr-defined]
        assert reflects(ring, lambda m: m == set(), 5)  # following again, it sees m expired


def test_members_on_a_lease_the_server_dropped_are_lost_and_joins_still_work(
    servers: Any, namespace: str
) -> None:
    """etcd: the shared lease revoked behind the client's back (as after a server-side
    expiry): its members are lost at once, and the next join gets a fresh lease."""
    with dcoord.connect(servers.url("etcd"), namespace=namespace) as client:
        lost = threading.Event()
        first = client.group("g").join("first", ttl=3, on_lost=lambda m: lost.set())
        lease = client.backend.leases.lease(3)  # type: ignore[attr-defined]
        client.backend.etcd.revoke_lease(lease.id)  # type: ignore[attr-defined]
        second = client.group("g").join("second", ttl=3)
        assert lost.wait(5)
        assert not first.alive and first.lost_reason
        assert second.alive
        assert set(client.group("g").members()) == {"second"}


def watched(views: list[GroupView], members: set[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if views and set(views[-1]) == members:
            return True
        time.sleep(0.01)
    return False


def _member_main(url: str, namespace: str, group: str, member_id: str, ttl: str) -> None:
    """The child process: join, report, and obey stdin."""

    say = line_writer()

    with dcoord.connect(url, namespace=namespace) as client:
        member = client.group(group).join(
            member_id,
            ttl=float(ttl),
            meta={"pid": os.getpid()},
            on_lost=lambda m: say(f"LOST {m.lost_reason}"),
        )
        say(f"JOINED {json.dumps({'ttl': member.ttl})}")
        for line in sys.stdin:
            command = line.strip()
            if command == "leave":
                member.leave()
                say("LEFT")
            elif command == "status":
                say(f"STATUS alive={member.alive}")
            elif command == "exit":
                break


if __name__ == "__main__":
    _member_main(*sys.argv[1:6])
