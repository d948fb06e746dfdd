"""The password shows nowhere: exception texts (with their chained causes), reprs, log
records at every level, the CLI's stdout and stderr, a child's environment.

Against real servers with TLS and auth, as a user confined to its namespace: what works,
what is denied (another namespace), refused credentials, a refused certificate, and the
``dcoord`` command as a subprocess (``-v``) doing the same. Everything captured is then
searched for the password, raw and percent-encoded.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from urllib.parse import quote

import pytest

import dcoord
from tests.servers import ROOT, Certificates, Server

NS = "app1"
SECRET = "Pw-s3cret/@:?#%-never-shown"
ADMIN_PASSWORD = "admin-pw-for-setup"


def assert_hidden(text: str) -> None:
    for form in {SECRET, quote(SECRET, safe=""), quote(SECRET)}:
        assert form not in text, f"the password ({form!r}) is in: {text}"


def described(exc: BaseException) -> str:
    """Everything a traceback shows of ``exc``: its chain, notes, and its repr."""
    return "".join(traceback.format_exception(exc)) + repr(exc)


@pytest.fixture
def log_text() -> Iterator[list[str]]:
    """Every log record of every logger at DEBUG and up, formatted with its traceback."""
    lines: list[str] = []
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(formatter.format(record))

    root = logging.getLogger()
    handler, level = Keep(logging.DEBUG), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield lines
    root.removeHandler(handler)
    root.setLevel(level)


def run_cli(*args: str, url: str) -> str:
    """``python -m dcoord -v ARGS`` with DCOORD_URL=url: its stdout and stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DCOORD_URL": url}
    done = subprocess.run(
        [sys.executable, "-m", "dcoord", "-v", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return done.stdout + done.stderr


def test_the_password_appears_in_no_output(
    real_backend: str,
    server_factory: Callable[..., Server],
    certificates: Certificates,
    log_text: list[str],
    dcoord_connect: Callable[..., dcoord.Client],
) -> None:
    server = server_factory(
        real_backend, persistent=False, tls=certificates, password=ADMIN_PASSWORD
    )
    url = server.confine(NS, NS, SECRET)
    wrong_password = server.user_url(NS, SECRET + "x")
    wrong_ca = server.user_url(NS, SECRET, **certificates.client_options(certificates.other_ca))
    seen: list[str] = []

    with dcoord_connect(url, namespace=NS) as client:
        seen += [repr(client), client.url, repr(client.settings), str(client.settings)]
        lock = client.lock("orders", ttl=10)
        assert lock.acquire(timeout=5)
        seen.append(repr(lock))
        lock.release()
        member = client.group("workers").join("w1")
        seen.append(repr(member))
        member.leave()

    with dcoord_connect(url, namespace="other") as client:
        for denied in (
            lambda: client.lock("orders", ttl=5).acquire(timeout=0),
            lambda: client.group("workers").join("w1"),
            lambda: client.fence("orders").admit(1),
        ):
            with pytest.raises(dcoord.PermissionDenied) as caught:
                denied()
            seen.append(described(caught.value))

    for refused in (wrong_password, wrong_ca):
        with pytest.raises(dcoord.ConfigError) as config_error:
            dcoord_connect(refused, namespace=NS, connect_timeout=10)
        seen.append(described(config_error.value))

    # The child prints its environment: DCOORD_URL there must have lost the password.
    child = [sys.executable, "-c", "import os; print(dict(os.environ))"]
    cli = run_cli("--namespace", NS, "lock", "orders", "--", *child, url=url)
    assert "DCOORD_FENCE" in cli, cli
    seen.append(cli)
    seen.append(run_cli("--namespace", NS, "members", "workers", url=url))
    denied_cli = run_cli("--namespace", "other", "lock", "orders", "--", "true", url=url)
    assert "PermissionDenied" in denied_cli, denied_cli
    seen.append(denied_cli)
    for refused in (wrong_password, wrong_ca):
        out = run_cli("--namespace", NS, "members", "workers", url=refused)
        assert "ConfigError" in out, out
        seen.append(out)

    seen += log_text
    assert any("denied" in line or "refused" in line for line in seen)
    assert any("DCOORD_URL" in line for line in seen)  # the child's environment was seen
    with pytest.raises(AssertionError):  # negative control: the search finds a leak
        assert_hidden(f"redis://{NS}:{quote(SECRET, safe='')}@host")
    for text in seen:
        assert_hidden(text)
