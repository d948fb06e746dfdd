"""Log records: structured fields for JSON handlers, and never a password.

Every record dcoord logs at DEBUG and up during a run of locks, members and 2PC against
a server that needs a password is captured; the formatted text (with tracebacks) and
every attribute of every record are searched for the password.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import dcoord
from dcoord import logfields
from tests.conformance.test_etcd_leases import enable_auth
from tests.servers import HOST, Server

SECRET = "s3cret-pw"


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[Capture]:
    logger = logging.getLogger("dcoord")
    handler, level = Capture(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def url_with_password(kind: str, server: Server) -> tuple[str, str]:
    """A URL of ``server`` for a user whose password is SECRET, and its namespace."""
    if kind == "redis":
        admin = redis.Redis(host=HOST, port=server.port)
        admin.acl_setuser(
            "app",
            enabled=True,
            passwords=[f"+{SECRET}"],
            keys=["*"],
            channels=["*"],
            commands=["+@all"],
        )
        admin.close()
        return f"redis://app:{SECRET}@{HOST}:{server.port}/0", "ok"
    enable_auth(server)  # user app, password s3cret-pw, namespace "ok"
    return f"etcd://app:{SECRET}@{HOST}:{server.port}", "ok"


class Participant:
    def __init__(self, name: str, *, prepare_fails: bool = False, commit_fails: bool = False):
        self.name = name
        self.prepare_fails = prepare_fails
        self.commit_fails = commit_fails

    def prepare(self, txid: str, payload: Any) -> bool:
        if self.prepare_fails:
            raise RuntimeError(f"{self.name} cannot prepare")
        return True

    def commit(self, txid: str) -> None:
        if self.commit_fails:
            raise RuntimeError(f"{self.name} cannot commit")

    def abort(self, txid: str) -> None:
        pass


def exercise(
    connect: Callable[..., dcoord.Client], url: str, namespace: str, lock_ttl: float
) -> None:
    """Locks, members and 2PC, including the failures that log warnings."""
    with connect(url, namespace=namespace) as client:
        with client.lock("job", ttl=30) as lock:
            assert lock.fence > 0
        lost = threading.Event()
        short = client.lock("short", ttl=lock_ttl, auto_renew=False, on_lost=lambda _: lost.set())
        assert short.acquire(blocking=False)
        assert lost.wait(lock_ttl + 10)
        with pytest.raises(dcoord.LockNotOwned):
            short.release()
        group = client.group("workers")
        with group.ring() as ring:
            member = group.join("w1", meta={"role": "test"})
            assert ring.wait_for(lambda r: "w1" in r, timeout=10)
            member.leave()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dcoord.DurabilityWarning)
            coord = client.coordinator(
                [
                    Participant("ok"),
                    Participant("refuses", prepare_fails=True),
                    Participant("deaf", commit_fails=True),
                ],
                phase2_timeout=0.2,
            )
        with pytest.raises(dcoord.TransactionAborted), coord.transaction() as tx:
            tx.enlist("ok")
            tx.enlist("refuses")
        with coord.transaction() as tx:
            tx.enlist("ok")
            tx.enlist("deaf")
        coord.recover()
    # Refused credentials (ConfigError; BackendUnavailable after retries where a server's
    # refusal is not recognised): the attempts are logged, with the URL, on the way.
    with pytest.raises(dcoord.DcoordError):
        connect(url.replace(SECRET, "wrong-pw"), namespace=namespace, connect_timeout=2)


def leaks(handler: logging.Handler, record: logging.LogRecord) -> bool:
    """Whether the formatted record (traceback included) or any attribute has SECRET."""
    return SECRET in handler.format(record) or any(
        SECRET in repr(value) for value in vars(record).values()
    )


def test_no_record_holds_the_password_and_every_record_has_fields(
    captured: Capture,
    real_backend: str,
    server_factory: Callable[..., Server],
    dcoord_connect: Callable[..., dcoord.Client],
) -> None:
    server = server_factory(real_backend, persistent=False)
    url, namespace = url_with_password(real_backend, server)
    exercise(dcoord_connect, url, namespace, lock_ttl=0.5 if real_backend == "redis" else 2.0)

    records = list(captured.records)
    names = {r.name for r in records}
    # The run logged what it should have: a lost lock, a refused prepare, a deaf participant.
    assert {"dcoord", "dcoord.lock", "dcoord.twopc"} <= names, names
    for record in records:
        assert not leaks(captured, record), captured.format(record)
        assert getattr(record, logfields.BACKEND, None) in (real_backend, None)
    # Negative control: the check finds a password in the message or in an extra field.
    planted = logging.getLogger("dcoord.lock")
    planted.debug("connecting to %s", url)
    planted.debug("connecting", extra={"dcoord_url": url})
    assert all(leaks(captured, record) for record in captured.records[len(records) :])

    def fields(name: str) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in vars(r).items() if k.startswith("dcoord_")}
            for r in records
            if r.name == name
        ]

    for name in ("dcoord", "dcoord.lock", "dcoord.twopc", f"dcoord.{real_backend}"):
        for got in fields(name):
            assert got.get(logfields.BACKEND) == real_backend, (name, got)
    lost = [f for f in fields("dcoord.lock") if f.get(logfields.LOCK) == "short"]
    assert lost and all(isinstance(f[logfields.FENCE], int) for f in lost)
    deaf = [f for f in fields("dcoord.twopc") if f.get(logfields.PARTICIPANT) == "deaf"]
    assert deaf and all(len(f[logfields.TXID]) == 32 for f in deaf)
    assert all(f[logfields.NAMESPACE] == namespace for f in fields("dcoord.lock"))
