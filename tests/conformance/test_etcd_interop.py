"""dcoord locks and etcd's own lock recipe (``etcdctl lock``, Go ``concurrency.Mutex``).

Both take the key with the lowest create revision under one prefix as the holder, so a
dcoord lock and ``etcdctl lock <dcoord lock --etcd-key NAME>`` exclude each other, queue
in one FIFO line, and agree on the fence (the holder key's create revision). These tests
run the real ``etcdctl`` (package etcd-client) against the test etcd server; they break
if dcoord's key layout drifts from what ``dcoord lock --etcd-key`` prints (docs/interop.md).

Each ``etcdctl lock`` runs a shell command that prints ``got KEY REV`` (etcdctl's
ETCD_LOCK_KEY / ETCD_LOCK_REV) once it holds the lock and, if asked to, then blocks
reading a fifo until the test lets it finish.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import dcoord
from dcoord.cli import main as cli_main
from tests.conftest import Servers

# A name that needs every escape of key_segment: the prefix below is not just the name.
NAME = "batch/50%{x}"
SEGMENT = "batch%2F50%25%7Bx%7D"
# Generous: etcdctl is a new process on a loaded 2-core machine.
DEADLINE = 20.0
# How long a waiter that must not be served yet is watched after its key is queued. The
# negative control (a prefix with a trailing slash, which does not exclude) shows that a
# wrongly served etcdctl has printed "got" by the time the test sees its key (measured:
# 5 of 5 runs), so a wrong grant shows up well within it.
QUIET = 1.0


# -- etcdctl as the other side ---------------------------------------------------------


class EtcdctlLock:
    """One ``etcdctl lock PREFIX -- sh -c ...`` process and the lines it prints."""

    def __init__(self, argv: list[str], env: dict[str, str], fifo: Path | None) -> None:
        self.fifo = fifo
        # A session of its own: teardown kills etcdctl and its shell as one group.
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.got = threading.Event()
        self.key = ""
        self.rev = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            words = line.split()
            if words[:1] == ["got"]:
                self.key, self.rev = words[1], int(words[2])
                self.got.set()
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_got(self) -> None:
        """Return once etcdctl holds the lock (its command printed ``got``)."""
        assert self.got.wait(DEADLINE), f"etcdctl never got the lock: {self.output()!r}"

    def finish(self) -> None:
        """Let the blocked command end; etcdctl then releases and must exit 0."""
        assert self.fifo is not None
        deadline = time.monotonic() + DEADLINE
        while True:
            # Non-blocking: ENXIO until the command has the fifo open for reading.
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        os.write(fd, b"go\n")
        os.close(fd)
        self.wait_exit()

    def wait_exit(self) -> None:
        assert self.process.wait(DEADLINE) == 0, self.output()

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class Etcdctl:
    """``etcdctl`` (API v3) pointed at the test etcd server."""

    def __init__(self, url: str, tmp: Path) -> None:
        binary = shutil.which("etcdctl")
        if binary is None:
            pytest.fail("etcdctl is not installed (Debian package etcd-client)", pytrace=False)
        parts = urlsplit(url)
        if parts.scheme != "etcd" or parts.username:
            pytest.skip(f"etcdctl interop runs against a plain etcd:// server, not {url!r}")
        # etcdctl takes dcoord's host list as it is: host:port[,host:port...], plaintext.
        self.base = [binary, f"--endpoints={parts.netloc}"]
        self.env = {**os.environ, "ETCDCTL_API": "3"}
        self.tmp = tmp
        self.started: list[EtcdctlLock] = []

    def lock(self, prefix: str, *, block: bool) -> EtcdctlLock:
        """Start ``etcdctl lock prefix``; with ``block`` its command waits for finish()."""
        fifo = None
        script = 'echo got "$ETCD_LOCK_KEY" "$ETCD_LOCK_REV"'
        argv = [*self.base, "lock", prefix, "--", "sh", "-c"]
        if block:
            fifo = self.tmp / f"go-{len(self.started)}"
            os.mkfifo(fifo)
            argv += [script + '; read _ < "$1"', "sh", str(fifo)]
        else:
            argv += [script]
        holder = EtcdctlLock(argv, self.env, fifo)
        self.started.append(holder)
        return holder

    def keys(self, prefix: str) -> list[tuple[str, int]]:
        """(key, create revision) of the keys under ``prefix``, oldest first, as
        ``etcdctl get --prefix -w json`` shows them to an operator."""
        kvs = json.loads(self.run("get", "--prefix", "-w", "json", prefix)).get("kvs", [])
        found = [(base64.b64decode(kv["key"]).decode(), int(kv["create_revision"])) for kv in kvs]
        return sorted(found, key=lambda kv: kv[1])

    def lease_of(self, key: str) -> int:
        """The id of the lease ``key`` is attached to."""
        out = self.run("get", "-w", "json", key)
        return int(json.loads(out)["kvs"][0]["lease"])

    def run(self, *args: str) -> str:
        return subprocess.run(
            [*self.base, *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=DEADLINE,
        ).stdout

    def wait_keys(self, prefix: str, count: int) -> list[tuple[str, int]]:
        """Poll (with a deadline) until ``count`` keys queue under ``prefix``."""
        deadline = time.monotonic() + DEADLINE
        while True:
            found = self.keys(prefix)
            if len(found) == count:
                return found
            assert time.monotonic() < deadline, f"expected {count} keys, found {found}"
            time.sleep(0.05)

    def stop(self) -> None:
        for holder in self.started:
            holder.kill()


@pytest.fixture
def etcdctl(servers: Servers, tmp_path: Path) -> Iterator[Etcdctl]:
    tool = Etcdctl(servers.url("etcd"), tmp_path)
    yield tool
    tool.stop()


@pytest.fixture
def etcd(servers: Servers, namespace: str) -> Iterator[Callable[[], dcoord.Client]]:
    """``etcd()``: a dcoord client of the test etcd server in this test's namespace."""
    clients: list[dcoord.Client] = []

    def make() -> dcoord.Client:
        clients.append(dcoord.connect(servers.url("etcd"), namespace=namespace))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def etcd_key(namespace: str, name: str, capsys: pytest.CaptureFixture[str]) -> str:
    """What ``dcoord lock --etcd-key NAME --namespace NS`` prints, the way an operator
    gets the prefix to hand to etcdctl or Go."""
    capsys.readouterr()
    assert cli_main(["lock", "--etcd-key", name, "--namespace", namespace]) == 0
    return capsys.readouterr().out.strip()


class Acquirer:
    """``lock.acquire(timeout)`` in a thread, so the test can watch it wait."""

    def __init__(self, lock: dcoord.Lock, timeout: float) -> None:
        self.result: list[bool] = []
        self._thread = threading.Thread(
            target=lambda: self.result.append(lock.acquire(timeout=timeout))
        )
        self._thread.start()

    def waits(self, seconds: float) -> bool:
        """True if acquire() is still waiting ``seconds`` from now."""
        self._thread.join(seconds)
        return self._thread.is_alive()

    def join(self) -> bool:
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), "dcoord acquire() did not return"
        return self.result[0]


# -- the key mapping (no server) -------------------------------------------------------


def test_etcd_key_prints_the_mutex_prefix(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DCOORD_URL", raising=False)
    assert etcd_key("interop2", "job", capsys) == "/dcoord/interop2/lock/job"
    assert etcd_key("interop2", NAME, capsys) == f"/dcoord/interop2/lock/{SEGMENT}"
    assert cli_main(["lock", "--etcd-key", "job"]) == 0
    assert capsys.readouterr().out == "/dcoord/default/lock/job\n"
    # The namespace a plain `dcoord lock` would use, from DCOORD_URL; port 1: no server.
    monkeypatch.setenv("DCOORD_URL", "etcd://127.0.0.1:1?namespace=prod")
    assert cli_main(["lock", "--etcd-key", "job"]) == 0
    assert capsys.readouterr().out == "/dcoord/prod/lock/job\n"
    assert cli_main(["lock", "--etcd-key", "job", "--namespace", "qa"]) == 0
    assert capsys.readouterr().out == "/dcoord/qa/lock/job\n"


def test_etcd_key_rejects_a_bad_namespace_and_a_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli_main(["lock", "--etcd-key", "job", "--namespace", "a/b"]) == 2
    assert "'a/b'" in capsys.readouterr().err
    assert cli_main(["lock", "--etcd-key", "job", "--", "true"]) == 2
    assert "true" in capsys.readouterr().err


# -- exclusion, FIFO and fences against etcdctl ----------------------------------------


def test_etcdctl_waits_for_a_dcoord_holder(
    etcd: Callable[[], dcoord.Client],
    etcdctl: Etcdctl,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prefix = etcd_key(namespace, NAME, capsys)
    lock = etcd().lock(NAME)
    assert lock.acquire(timeout=DEADLINE)
    # dcoord's key is where the printed prefix says, and etcdctl shows its fence.
    [(dcoord_key, created)] = etcdctl.keys(prefix + "/")
    assert dcoord_key.startswith(prefix + "/")
    assert "/" not in dcoord_key[len(prefix) + 1 :]
    assert created == lock.fence

    other = etcdctl.lock(prefix, block=False)
    _, (etcdctl_key, queued_at) = etcdctl.wait_keys(prefix + "/", 2)
    assert not other.got.wait(QUIET), "etcdctl got the lock while dcoord held it"
    assert lock.held

    lock.release()
    other.wait_got()
    other.wait_exit()
    assert other.key == etcdctl_key
    # ETCD_LOCK_REV is the revision at which etcdctl's wait ended, after dcoord's release,
    # not its key's create revision: Go's Mutex.Header().Revision is no fence.
    assert other.rev > queued_at > lock.fence


def test_trailing_slash_breaks_exclusion_negative_control(
    etcd: Callable[[], dcoord.Client],
    etcdctl: Etcdctl,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With ``PREFIX/`` etcdctl queues under ``PREFIX//``: it does not see dcoord's holder
    (the check above would catch it within QUIET), while dcoord does see etcdctl's."""
    prefix = etcd_key(namespace, NAME, capsys)
    first, second = etcd().lock(NAME), etcd().lock(NAME)
    assert first.acquire(timeout=DEADLINE)
    wrong = etcdctl.lock(prefix + "/", block=True)
    etcdctl.wait_keys(prefix + "/", 2)
    wrong.wait_got()
    assert first.held
    assert wrong.key.startswith(prefix + "//")
    first.release()
    # dcoord's range PREFIX/ holds etcdctl's PREFIX//... key, which is the oldest now.
    assert second.acquire(timeout=QUIET) is False
    wrong.finish()
    assert second.acquire(timeout=DEADLINE)
    second.release()


def test_dcoord_waits_for_an_etcdctl_holder_and_the_fences_agree(
    etcd: Callable[[], dcoord.Client],
    etcdctl: Etcdctl,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prefix = etcd_key(namespace, NAME, capsys)
    holder = etcdctl.lock(prefix, block=True)
    holder.wait_got()
    [(key, created)] = etcdctl.keys(prefix + "/")
    # Uncontended, etcdctl's ETCD_LOCK_REV is its key's create revision.
    assert (holder.key, holder.rev) == (key, created)

    lock = etcd().lock(NAME)
    assert lock.acquire(timeout=QUIET) is False
    waiter = Acquirer(lock, DEADLINE)
    etcdctl.wait_keys(prefix + "/", 2)
    assert waiter.waits(QUIET), "dcoord got the lock while etcdctl held it"
    holder.finish()
    assert waiter.join() is True
    assert lock.fence > created
    # While dcoord holds, its fence is the create revision etcdctl shows for its key:
    # what a Go holder's compare on CreateRevision(m.Key()) uses.
    [(mine, mine_created)] = etcdctl.keys(prefix + "/")
    assert mine != key
    assert mine_created == lock.fence
    lock.release()
    assert etcdctl.keys(prefix + "/") == []


def test_fifo_across_dcoord_and_etcdctl(
    etcd: Callable[[], dcoord.Client],
    etcdctl: Etcdctl,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """dcoord A holds; etcdctl E1, dcoord B, etcdctl E2 queue in that order; each is
    served in turn, whoever's library it uses."""
    prefix = etcd_key(namespace, NAME, capsys)
    a, b = etcd().lock(NAME), etcd().lock(NAME)
    assert a.acquire(timeout=DEADLINE)
    e1 = etcdctl.lock(prefix, block=True)
    etcdctl.wait_keys(prefix + "/", 2)
    b_waits = Acquirer(b, DEADLINE)
    etcdctl.wait_keys(prefix + "/", 3)
    e2 = etcdctl.lock(prefix, block=False)
    queue_ = etcdctl.wait_keys(prefix + "/", 4)

    a.release()
    e1.wait_got()
    assert e1.key == queue_[1][0]
    assert b_waits.waits(QUIET), "dcoord B overtook etcdctl E1"
    e1.finish()
    assert b_waits.join() is True
    assert b.fence == queue_[2][1]
    assert not e2.got.wait(QUIET), "etcdctl E2 overtook dcoord B"
    # E1's ETCD_LOCK_REV (where its wait ended) exceeds B's later fence: a fenced resource
    # fed ETCD_LOCK_REV would reject B. Fence with the key's create revision instead.
    assert e1.rev > b.fence > queue_[1][1] > a.fence
    b.release()
    e2.wait_got()
    e2.wait_exit()
    assert e2.key == queue_[3][0]


def test_revoking_a_dcoord_lease_with_etcdctl_loses_every_lock_on_it(
    etcd: Callable[[], dcoord.Client],
    etcdctl: Etcdctl,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Auto-renewed locks of one client and one TTL share a lease (docs/interop.md)."""
    client = etcd()
    lost: list[threading.Event] = [threading.Event(), threading.Event()]
    a = client.lock("a", ttl=3, on_lost=lambda _: lost[0].set())
    b = client.lock("b", ttl=3, on_lost=lambda _: lost[1].set())
    assert a.acquire(timeout=DEADLINE) and b.acquire(timeout=DEADLINE)
    [(a_key, _)] = etcdctl.keys(etcd_key(namespace, "a", capsys) + "/")
    [(b_key, _)] = etcdctl.keys(etcd_key(namespace, "b", capsys) + "/")
    lease = etcdctl.lease_of(a_key)
    assert etcdctl.lease_of(b_key) == lease
    assert a_key.rsplit("/", 1)[1].startswith(f"{lease:016x}-")

    etcdctl.run("lease", "revoke", f"{lease:x}")
    assert lost[0].wait(DEADLINE) and lost[1].wait(DEADLINE)
    assert not a.held and not b.held
    other = etcd().lock("a")
    assert other.acquire(timeout=DEADLINE)
    assert other.fence > a.fence
    other.release()
