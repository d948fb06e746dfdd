"""One error type per failure: a closed client, a duplicate member, too few members.

Every backend (memory, Redis, etcd) gives the same types.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import dcoord
from dcoord.membership import GroupView

Connect = Callable[..., dcoord.Client]


def _ignore(view: GroupView) -> None:
    pass


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_closed_client_raises_client_closed_for_everything_it_makes(connect: Connect) -> None:
    client = connect()
    fence = client.fence("res")
    group = client.group("g")
    client.close()
    attempts: dict[str, Callable[[], Any]] = {
        "ping": client.ping,
        "lock": lambda: client.lock("l"),
        "fence": lambda: client.fence("res"),
        "group": lambda: client.group("g"),
        "coordinator": lambda: client.coordinator(participants=[]),
        "on_close": lambda: client.on_close(lambda: None),
        "fence.admit": lambda: fence.admit(1),
        "fence.write": lambda: fence.write(1, "k", b"v"),
        "fence.highest": fence.highest,
        "join": lambda: group.join("m", ttl=30),
        "members": group.members,
        "view": group.view,
        "epoch": group.epoch,
        "ring": group.ring,
        "watch": lambda: group.watch(_ignore),
    }
    raised = {}
    for what, attempt in attempts.items():
        try:
            attempt()
        except Exception as exc:
            named = isinstance(exc, dcoord.ClientClosed) and client.url in str(exc)
            raised[what] = "ClientClosed" if named else repr(exc)
        else:
            raised[what] = "nothing"
    assert raised == dict.fromkeys(attempts, "ClientClosed")


def test_a_join_that_races_close_raises_client_closed_and_leaves_the_member(
    connect: Connect,
) -> None:
    client, observer = connect(), connect()
    store = client.backend.groups
    real_join = store.join
    closers: list[threading.Thread] = []

    def join_then_close(*args: Any, **kwargs: Any) -> Any:
        # The server has registered the member when another thread closes the client.
        registration = real_join(*args, **kwargs)
        closers.append(threading.Thread(target=client.close))
        closers[0].start()
        assert wait_until(lambda: client.closed, 10)
        return registration

    store.join = join_then_close  # type: ignore[method-assign]
    with pytest.raises(dcoord.ClientClosed):
        client.group("g").join("m", ttl=30)
    closers[0].join(10)
    assert not closers[0].is_alive()
    assert observer.group("g").members() == {}  # left at once, not kept for its 30 s TTL


def test_close_runs_every_hook_even_when_one_fails(
    connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    client = connect()
    ran: list[str] = []
    client.on_close(lambda: ran.append("first registered"))

    def failing() -> None:
        raise dcoord.ClientClosed("a hook's own failure")

    client.on_close(failing)
    client.on_close(lambda: ran.append("last registered"))
    with caplog.at_level(logging.WARNING, logger="dcoord"):
        client.close()  # raises nothing
    assert ran == ["last registered", "first registered"]
    assert client.closed
    failures = [r for r in caplog.records if r.levelno == logging.WARNING and r.exc_info]
    assert len(failures) == 1 and "close hook" in failures[0].getMessage()
    with pytest.raises(dcoord.ClientClosed):
        client.ping()  # the backend was closed as well


def test_joining_a_live_member_id_again_raises_already_joined(connect: Connect) -> None:
    a, b = connect(), connect()
    a.group("g").join("node", ttl=30)
    with pytest.raises(dcoord.AlreadyJoined, match="'node'") as info:
        b.group("g").join("node", ttl=30)
    assert isinstance(info.value, dcoord.MembershipError)
    assert not isinstance(info.value, dcoord.ConfigError)  # it is no bad input


def test_nodes_for_more_than_the_live_members_raises_not_enough_members(
    connect: Connect,
) -> None:
    client = connect()
    group = client.group("g")
    ring = group.ring()
    with pytest.raises(dcoord.NotEnoughMembers, match="'g' has 0"):
        ring.nodes_for("k", 1)  # no live members at all
    group.join("a", ttl=30)
    group.join("b", ttl=30)
    assert ring.wait_for(lambda r: len(r) == 2, 5)
    assert len(ring.nodes_for("k", 2)) == 2
    with pytest.raises(
        dcoord.NotEnoughMembers, match=r"needs 3 live members; group 'g' has 2$"
    ) as info:
        ring.nodes_for("k", 3)
    assert not isinstance(info.value, dcoord.ConfigError)
    for bad in (0, -1, 1.5, True):  # bad input stays a ConfigError
        with pytest.raises(dcoord.ConfigError):
            ring.nodes_for("k", bad)  # type: ignore[arg-type]
