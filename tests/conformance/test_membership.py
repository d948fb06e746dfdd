"""Group membership and the live ring: the same assertions on memory, Redis and etcd."""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import dcoord
from dcoord.membership import GroupView

Connect = Callable[..., dcoord.Client]


def short_ttl(backend: str) -> float:
    """The shortest TTL worth testing: etcd grants no lease under ~2 s."""
    return 2.0 if backend == "etcd" else 0.6


class Recorder:
    """A watch callback that records every view it is given."""

    def __init__(self) -> None:
        self.views: list[GroupView] = []
        self.cond = threading.Condition()

    def __call__(self, view: GroupView) -> None:
        with self.cond:
            self.views.append(view)
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[GroupView], bool], timeout: float = 5.0) -> GroupView:
        with self.cond:
            ok = self.cond.wait_for(lambda: bool(self.views) and predicate(self.views[-1]), timeout)
            assert ok, f"no matching view within {timeout} s; got {self.views}"
            return self.views[-1]


def test_join_lists_member_with_weight_and_meta(connect: Connect) -> None:
    a, b = connect(), connect()
    meta = {"addr": "127.0.0.1:11211", "tags": ["x", "ü"], "n": 1.5, "nested": {"k": None}}
    member = a.group("cache").join("node-a", weight=2.5, meta=meta, ttl=30)
    assert isinstance(member, dcoord.Member)
    assert member.alive
    seen = b.group("cache").members()
    assert list(seen) == ["node-a"]
    assert seen["node-a"] == dcoord.Member("node-a", 2.5, meta)
    assert seen["node-a"].weight == 2.5
    assert dict(seen["node-a"].meta) == meta
    assert b.group("other").members() == {}


def test_leave_removes_at_once_and_every_change_bumps_the_epoch(connect: Connect) -> None:
    a, b = connect(), connect()
    group, observer = a.group("g"), b.group("g")
    e0 = observer.epoch()
    x = group.join("x", ttl=30)
    e1 = observer.epoch()
    y = group.join("y", ttl=30)
    e2 = observer.epoch()
    x.leave()
    view = observer.view()  # no waiting: a leave is visible to the next read
    assert set(view) == {"y"}
    assert e0 < e1 < e2 < view.epoch
    x.leave()  # idempotent
    assert not x.alive and x.left
    assert set(observer.members()) == {"y"}
    assert y.alive


def test_duplicate_live_id_is_refused_and_changes_nothing(connect: Connect) -> None:
    a, b = connect(), connect()
    first = a.group("g").join("node", meta={"owner": "a"}, ttl=30)
    epoch = a.group("g").epoch()
    for client in (b, a):
        with pytest.raises(dcoord.AlreadyJoined, match="'node'"):
            client.group("g").join("node", meta={"owner": "other"}, ttl=30)
    view = b.group("g").view()
    assert view.epoch == epoch
    assert dict(view["node"].meta) == {"owner": "a"}
    first.leave()
    again = b.group("g").join("node", meta={"owner": "b"}, ttl=30)
    assert again.alive
    assert dict(a.group("g").members()["node"].meta) == {"owner": "b"}


class Unserialisable:
    pass


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"member_id": ""}, "''"),
        ({"member_id": 7}, "7"),
        ({"member_id": "a\nb"}, "'a\\\\nb'"),
        ({"member_id": "x" * 300}, "xxxx"),
        ({"weight": 0}, "0"),
        ({"weight": -1.0}, "-1.0"),
        ({"weight": math.nan}, "nan"),
        ({"weight": math.inf}, "inf"),
        ({"weight": True}, "True"),
        ({"weight": "1"}, "'1'"),
        ({"weight": 5000}, "5000"),
        ({"ttl": 0}, "0"),
        ({"ttl": -1}, "-1"),
        ({"ttl": math.nan}, "nan"),
        ({"ttl": 0.01}, "0.01"),
        ({"ttl": "soon"}, "'soon'"),
        ({"meta": {"x": Unserialisable()}}, "Unserialisable"),
        ({"meta": {"x": math.nan}}, "nan"),
        ({"meta": {1: "int key"}}, "int key"),
        ({"meta": {"t": (1, 2)}}, r"\(1, 2\)"),
        ({"meta": ["not", "a", "mapping"]}, "mapping"),
        ({"meta": {"big": "x" * 70_000}}, "bytes"),
    ],
)
def test_bad_input_is_config_error_naming_the_value(
    client: dcoord.Client, kwargs: dict[str, Any], named: str
) -> None:
    group = client.group("g")
    epoch = group.epoch()
    args = {"member_id": "m", **kwargs}
    member_id = args.pop("member_id")
    with pytest.raises(dcoord.ConfigError, match=named) as info:
        group.join(member_id, **args)
    assert isinstance(info.value, ValueError)
    view = group.view()
    assert dict(view) == {}
    assert view.epoch == epoch


@pytest.mark.parametrize("name", ["", "a/b", "-x", "x" * 129, "a b", None])
def test_bad_group_name_is_config_error(client: dcoord.Client, name: Any) -> None:
    with pytest.raises(dcoord.ConfigError, match="group name"):
        client.group(name)


@pytest.mark.parametrize("vnodes", [0, -3, 1.5, True, "160"])
def test_bad_vnodes_is_config_error(client: dcoord.Client, vnodes: Any) -> None:
    with pytest.raises(dcoord.ConfigError, match="vnodes"):
        client.group("g").ring(vnodes=vnodes)


def test_live_ring_follows_joins_and_leaves(connect: Connect) -> None:
    a, b = connect(), connect()
    ring = b.group("cache").ring(vnodes=40)
    assert len(ring) == 0 and ring.ring is None
    with pytest.raises(dcoord.NoMembers):
        ring.node_for("k")
    members = {
        name: a.group("cache").join(name, weight=w, ttl=30)
        for name, w in (("n1", 1.0), ("n2", 2.0), ("n3", 0.5))
    }
    assert ring.wait_for(lambda r: set(r.members) == {"n1", "n2", "n3"}, 5)
    expected = dcoord.HashRing({"n1": 1.0, "n2": 2.0, "n3": 0.5}, vnodes=40)
    assert ring.ring == expected
    keys = [f"user:{i}" for i in range(500)]
    assert [ring.node_for(k) for k in keys] == [expected.node_for(k) for k in keys]
    assert ring.nodes_for("user:1", 3) == expected.nodes_for("user:1", 3)
    epoch = ring.epoch
    members["n2"].leave()
    assert ring.wait_for(lambda r: "n2" not in r, 5)
    assert ring.epoch > epoch
    assert ring.ring == expected.without_node("n2")
    moved = sum(expected.node_for(k) != ring.node_for(k) for k in keys)
    assert moved == sum(expected.node_for(k) == "n2" for k in keys)  # only n2's keys moved
    ring.close()
    members["n1"].leave()
    time.sleep(0.3)  # a closed ring must not follow; nothing to wait for here
    assert "n1" in ring


def test_a_ring_made_after_a_join_already_has_the_member(connect: Connect) -> None:
    a = connect()
    group = a.group("g")
    watch = group.watch(lambda view: None)  # a follower already runs for this group
    group.join("late", ttl=30)
    ring = group.ring()
    assert "late" in ring
    watch.stop()


def test_member_that_stops_heart_beating_disappears_within_its_ttl(
    connect: Connect, backend: str
) -> None:
    ttl = short_ttl(backend)
    member_client, observer = connect(), connect()
    ring = observer.group("g").ring()
    recorder = Recorder()
    observer.group("g").watch(recorder)
    member = member_client.group("g").join("dying", ttl=ttl)
    member_client.group("g").join("other", ttl=30)
    assert ring.wait_for(lambda r: "dying" in r, 5)
    # Its process "dies": no heart-beat (nor lease keep-alive) is ever sent again. Nobody
    # reads the group: the watchers must notice the expiry on their own.
    member_client.scheduler.close()
    stopped = time.monotonic()
    assert ring.wait_for(lambda r: "dying" not in r, ttl + 3)
    elapsed = time.monotonic() - stopped
    assert elapsed <= member.ttl + 1.5, f"gone after {elapsed:.2f} s, ttl {member.ttl}"
    assert set(ring.members) == {"other"}
    recorder.wait_for(lambda view: set(view) == {"other"})
    assert not member.alive  # its TTL ran out unconfirmed


def test_paused_member_is_marked_lost_and_never_silently_rejoins(
    connect: Connect, backend: str
) -> None:
    ttl = short_ttl(backend)
    member_client, observer = connect(), connect()
    lost: list[tuple[str, str | None]] = []
    lost_event = threading.Event()

    def on_lost(member: dcoord.JoinedMember) -> None:
        lost.append((member.id, member.lost_reason))
        lost_event.set()

    member = member_client.group("g").join("paused", ttl=ttl, on_lost=on_lost)
    ring = observer.group("g").ring()
    assert "paused" in ring
    # Freeze the member's client (a GC pause, SIGSTOP): its scheduler starts nothing past
    # the TTL, so neither heart-beats nor lease keep-alives go out.
    gate = threading.Event()
    member_client.scheduler.pause(until=gate)
    try:
        assert ring.wait_for(lambda r: "paused" not in r, ttl + 3)
        deadline = time.monotonic() + 2
        while member.alive and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not member.alive  # known even before the thread runs again
    finally:
        gate.set()
    assert lost_event.wait(ttl + 5), "on_lost was not called"
    assert lost == [("paused", member.lost_reason)]
    assert member.lost_reason
    # The client runs again: it must not have put the member back.
    time.sleep(ttl / 2)
    assert "paused" not in observer.group("g").members()
    assert "paused" not in ring
    late: list[str] = []
    member.on_lost(lambda m: late.append(m.id))  # registered after the loss: called at once
    deadline = time.monotonic() + 2
    while not late and time.monotonic() < deadline:
        time.sleep(0.01)
    assert late == ["paused"]
    member.leave()  # harmless after the loss
    assert not member.alive


def test_watch_gets_current_set_then_every_change(connect: Connect) -> None:
    a, b = connect(), connect()
    a.group("g").join("first", ttl=30)
    recorder = Recorder()
    watch = b.group("g").watch(recorder)
    recorder.wait_for(lambda view: set(view) == {"first"})
    second = a.group("g").join("second", weight=3, ttl=30)
    view = recorder.wait_for(lambda view: set(view) == {"first", "second"})
    assert view["second"].weight == 3
    second.leave()
    recorder.wait_for(lambda view: set(view) == {"first"})
    epochs = [v.epoch for v in recorder.views]
    assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs), epochs
    sets = [frozenset(v) for v in recorder.views]
    assert all(x != y for x, y in itertools.pairwise(sets)), "a call without a change"
    watch.stop()
    count = len(recorder.views)
    a.group("g").join("third", ttl=30)
    time.sleep(0.3)  # a stopped watch has nothing to deliver; give it the chance to be wrong
    assert len(recorder.views) == count
    assert not watch.active


def test_slow_or_raising_callback_does_not_hold_up_others(connect: Connect) -> None:
    a, b = connect(), connect()
    group = b.group("g")
    release = threading.Event()
    slow_calls: list[GroupView] = []

    def slow(view: GroupView) -> None:
        slow_calls.append(view)
        release.wait(10)

    raising_calls: list[GroupView] = []

    def raising(view: GroupView) -> None:
        raising_calls.append(view)
        raise RuntimeError("callback bug")

    recorder = Recorder()
    group.watch(slow)
    group.watch(raising)
    group.watch(recorder)
    ring = group.ring()
    for name in ("m1", "m2", "m3"):
        a.group("g").join(name, ttl=30)
        recorder.wait_for(lambda view, name=name: name in view)
        assert ring.wait_for(lambda r, name=name: name in r, 5)
    # Still called after raising: each watch delivers on a thread of its own, so the
    # recorder and the ring having seen m3 does not mean this one has been called yet.
    deadline = time.monotonic() + 5
    while len(raising_calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(raising_calls) >= 2
    assert len(slow_calls) == 1  # stuck in its first call, while the others went on
    release.set()
    deadline = time.monotonic() + 5
    while (not slow_calls or set(slow_calls[-1]) != {"m1", "m2", "m3"}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.01)
    assert set(slow_calls[-1]) == {"m1", "m2", "m3"}  # then caught up with the newest set


def test_closing_the_client_leaves_its_members_and_stops_following(connect: Connect) -> None:
    a, b = connect(), connect()
    a.group("g").join("a1", ttl=30)
    a.group("h").join("a2", ttl=30)
    ring = a.group("g").ring()
    b.group("g").join("b1", ttl=30)
    a.close()
    assert b.group("g").members().keys() == {"b1"}
    assert b.group("h").members() == {}
    with pytest.raises(dcoord.ClientClosed, match="closed"):
        a.group("g").join("again")
    assert ring.members.keys() <= {"a1", "b1"}


def test_member_ids_are_exact_strings(connect: Connect) -> None:
    a = connect()
    group = a.group("g")
    ids = ["node:1", "node/2", "ünï cødé", "*", "a b"]
    for member_id in ids:
        group.join(member_id, ttl=30)
    assert set(group.members()) == set(ids)
    assert set(group.ring().members) == set(ids)


def test_members_command_lists_live_members(
    connect: Connect, backend_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from dcoord.cli import main

    connect().group("cache").join("n1", weight=2, meta={"addr": "127.0.0.1:1"}, ttl=30)
    argv = ["members", "cache", "--url", backend_url, "--namespace", namespace]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 live member" in out and "n1" in out and '"addr": "127.0.0.1:1"' in out
    assert main([*argv, "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["members"] == {"n1": {"weight": 2.0, "meta": {"addr": "127.0.0.1:1"}}}
    assert line["epoch"] >= 1
    assert main(["members", "bad/name", "--url", backend_url]) == 2


def test_members_command_watch_prints_each_change(
    connect: Connect, backend_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from dcoord.cli import main

    client = connect()
    client.group("g").join("first", ttl=30)
    argv = ["members", "g", "--url", backend_url, "--namespace", namespace, "--json"]
    result: list[int] = []
    command = threading.Thread(
        target=lambda: result.append(main([*argv, "--watch", "--count", "2"]))
    )
    command.start()
    # Its first line is the current set; hold it until the command has printed it.
    deadline = time.monotonic() + 10
    printed = ""
    while "first" not in printed and time.monotonic() < deadline:
        printed += capsys.readouterr().out
        time.sleep(0.01)
    client.group("g").join("second", ttl=30)
    command.join(10)
    assert result == [0]
    printed += capsys.readouterr().out
    sets = [set(json.loads(line)["members"]) for line in printed.splitlines()]
    assert sets == [{"first"}, {"first", "second"}]


def test_redis_script_is_reloaded_after_script_flush(servers: Any, namespace: str) -> None:
    """The Lua script runs by SHA; a server that lost its script cache gets it again."""
    with dcoord.connect(servers.url("redis"), namespace=namespace) as client:
        member = client.group("g").join("m", ttl=0.6)
        client.backend.redis.script_flush()  # type: ignore[attr-defined]
        assert set(client.group("g").members()) == {"m"}
        client.backend.redis.script_flush()  # type: ignore[attr-defined]
        time.sleep(0.6)  # several heart-beats (every 0.2 s) run against the empty cache
        assert member.alive
        assert set(client.group("g").members()) == {"m"}


def test_watch_skips_a_change_undone_while_its_callback_was_busy(connect: Connect) -> None:
    a, b = connect(), connect()
    a.group("g").join("a", ttl=30)
    group = b.group("g")
    release = threading.Event()
    calls: list[set[str]] = []

    def busy(view: GroupView) -> None:
        calls.append(set(view))
        release.wait(10)

    group.watch(busy)
    ring = group.ring()  # same follower: when the ring has a set, the watch was given it
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    passing = a.group("g").join("passing", ttl=30)
    assert ring.wait_for(lambda r: "passing" in r, 5)
    passing.leave()
    assert ring.wait_for(lambda r: "passing" not in r, 5)
    release.set()
    a.group("g").join("c", ttl=30)
    assert ring.wait_for(lambda r: "c" in r, 5)
    deadline = time.monotonic() + 5
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls == [{"a"}, {"a", "c"}]
