"""Inspection of held locks (dcoord.inspect, ``dcoord locks``): every backend."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import dcoord
from dcoord.cli import main

Connect = Callable[..., dcoord.Client]


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_info_names_the_holder_fence_time_and_ttl(connect: Connect) -> None:
    holder = connect(label="worker 7")
    other = connect()
    before = time.time()
    lock = holder.lock("jobs/{a}%b", ttl=20)
    lock.acquire()
    info = other.lock("jobs/{a}%b").info()
    assert info is not None
    assert info.name == "jobs/{a}%b"
    assert info.holder == f"{socket.gethostname()}:{os.getpid()}"
    assert info.label == "worker 7"
    assert info.fence == lock.fence
    assert info.acquired_at is not None
    # Server clocks (Redis TIME) may differ from ours by a little on one machine.
    assert before - 2 <= info.acquired_at <= time.time() + 2
    assert info.ttl_left is not None and 10 < info.ttl_left <= 20
    lock.release()
    assert other.lock("jobs/{a}%b").info() is None


def test_no_label_is_none(client: dcoord.Client) -> None:
    with client.lock("plain", ttl=20):
        info = client.lock("plain").info()
        assert info is not None and info.label is None


def test_listing_filters_by_prefix_and_skips_free_locks(client: dcoord.Client) -> None:
    with client.lock("a/1", ttl=20), client.lock("a/2", ttl=20), client.lock("b", ttl=20):
        client.lock("a/3", ttl=20).acquire()
        free = client.lock("a/free", ttl=20)
        free.acquire()
        free.release()
        assert [i.name for i in client.locks("a/")] == ["a/1", "a/2", "a/3"]
        assert [i.name for i in client.locks()] == ["a/1", "a/2", "a/3", "b"]
        assert client.locks("zzz") == []


def waiters(client: dcoord.Client) -> int | None:
    info = client.lock("busy").info()
    return None if info is None else info.waiters


def test_waiters_are_counted(connect: Connect) -> None:
    holder, waiter = connect(), connect()
    lock = holder.lock("busy", ttl=20)
    lock.acquire()
    got = threading.Event()

    def wait() -> None:
        with waiter.lock("busy", ttl=20, timeout=30):
            got.set()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    try:
        # Redis counts subscribed clients: one for the waiting client.
        assert wait_until(lambda: waiters(holder) == 1, 10)
    finally:
        lock.release()
        assert got.wait(10)
        thread.join(10)
    info = holder.lock("busy").info()
    assert info is None or info.holder is not None  # the waiter may still hold it


def test_cli_locks_json_and_table(
    client: dcoord.Client, backend_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with client.lock("cli/x", ttl=20) as lock:
        assert main(["locks", "--url", backend_url, "--namespace", namespace, "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert row["name"] == "cli/x" and row["fence"] == lock.fence
        assert row["holder"] == f"{socket.gethostname()}:{os.getpid()}"
        assert main(["locks", "--url", backend_url, "--namespace", namespace]) == 0
        out = capsys.readouterr().out
        assert "cli/x" in out and str(lock.fence) in out and "1 lock(s) held" in out
        assert main(["locks", "--url", backend_url, "--namespace", namespace, "--prefix", "z"]) == 0
        assert "0 lock(s) held" in capsys.readouterr().out


def test_label_option_is_validated() -> None:
    with pytest.raises(dcoord.ConfigError, match="label must be 1-200 printable"):
        dcoord.connect("memory://", label="two\nlines")
    with dcoord.connect("memory://", label="from-kwarg") as client:
        assert client.settings.options["label"] == "from-kwarg"


def test_tokens_of_other_writers_have_no_identity() -> None:
    from dcoord.inspect import holder_suffix, parse_identity_json, parse_token

    assert parse_token("0123456789abcdef0123456789abcdef") is None  # an older dcoord's
    mine = parse_token("0123456789abcdef0123456789abcdef" + holder_suffix("a|b"))
    assert mine is not None and mine.label == "a|b"  # the label may hold the separator
    assert parse_identity_json(b"") == (None, None)  # etcdctl lock writes no value


def test_a_holder_without_identity_is_listed_without_one(client: dcoord.Client) -> None:
    backend: Any = client.backend
    if backend.kind == "memory":
        pytest.skip("nothing but this dcoord writes an embedded store")
    if backend.kind == "redis":
        # What a dcoord before this version wrote: a bare random token (and its fence).
        key = f"{backend.prefix}lock:{{old}}"
        backend.redis.set(f"{key}:fence", 41)
        backend.redis.set(key, "0123456789abcdef0123456789abcdef", px=20000)
        fence = 41
    else:
        # What etcdctl lock / Go's concurrency.Mutex write: an empty value on a lease.
        lease = backend.etcd.lease(20)
        meta = backend.etcd.put(f"{backend.prefix}lock/old/{lease.id:x}", b"", lease=lease)
        fence = meta.header.revision
    (info,) = client.locks()
    assert (info.name, info.holder, info.label, info.fence) == ("old", None, None, fence)
    assert info.ttl_left is not None and info.ttl_left > 10
