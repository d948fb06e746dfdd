"""The ``dcoord`` command line: run in-process (``dcoord.cli.main``) where that is enough,
as a subprocess (``python -m dcoord``) where exit codes, stderr and environment matter,
and against real servers where the behaviour depends on one (a lock held elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import dcoord
from dcoord import cli
from dcoord.cli import lock as cli_lock
from dcoord.config import settings_from
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-pw"


@pytest.fixture(autouse=True)
def no_dcoord_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here sees the DCOORD_URL of whoever runs the suite."""
    monkeypatch.delenv("DCOORD_URL", raising=False)


def memory_url() -> str:
    return f"memory://cli-{uuid.uuid4().hex[:8]}"


def main(argv: Sequence[str]) -> int:
    """``dcoord.cli.main``, with argparse's exit (of older versions too) as a return code."""
    try:
        return cli.main(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without DCOORD_URL, importing this checkout's dcoord."""
    environ = {k: v for k, v in os.environ.items() if k != "DCOORD_URL"}
    paths = [os.environ.get("PYTHONPATH"), str(ROOT)]
    environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return {**environ, **extra}


def run_dcoord(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m dcoord ARGS`` (stdout and stderr captured)."""
    return subprocess.run(
        [sys.executable, "-m", "dcoord", *args],
        cwd=ROOT,
        env=child_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_error_line(stderr: str, kind: str) -> str:
    """The single line of ``stderr``, checked to be ``dcoord: <kind>: <message>``."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"dcoord: {kind}: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def subcommand_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from subcommand_parsers(sub)


# -- help ---------------------------------------------------------------------------------


def test_help_texts_have_no_rest_markup() -> None:
    parsers = list(subcommand_parsers(cli.build_parser()))
    assert len(parsers) >= 10  # dcoord, 5 commands, 4 tx actions
    for parser in parsers:
        text = parser.format_help()
        assert "``" not in text, (parser.prog, text)
        assert not re.search(r":[a-z]+:`", text), (parser.prog, text)


def test_lock_help_documents_its_exit_codes() -> None:
    done = run_dcoord("lock", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for code in ("2", "123", "124", "125", "126", "127", "128+N"):
        assert re.search(rf"(^|\s){re.escape(code)}\s", text), (code, done.stdout)
    assert "timeout(1)" in text and "password" in text


# -- where the options go -----------------------------------------------------------------


def test_options_before_the_command_are_used(capsys: pytest.CaptureFixture[str]) -> None:
    url = memory_url()
    argv = ["demo", "--accounts", "4", "--transfers", "4", "--workers", "1", "--seed", "1"]
    assert main(["--url", url, "-v", *argv]) == 0
    assert f"at {url}," in capsys.readouterr().out
    assert main(["--url", url, "--namespace", "ns1", "members", "g", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["members"] == {}
    # Given on both sides, the one after the command name wins.
    assert main(["--url", "bogus://x", "members", "g", "--url", url]) == 0


def test_options_before_lock_are_used(capfd: pytest.CaptureFixture[str]) -> None:
    url = memory_url()
    show = "import os; print(os.environ['DCOORD_URL'], os.environ['DCOORD_FENCE'])"
    argv = ["lock", "job", "--", sys.executable, "-c", show]
    assert main(["--url", url, "--namespace", "ns1", *argv]) == 0
    assert capfd.readouterr().out.split() == [f"{url}?namespace=ns1", "1"]
    # ... and after the name, before "--".
    assert main(["lock", "job", "--url", url, "-v", "--ttl", "5", "--", *argv[3:]]) == 0
    out = capfd.readouterr()
    assert out.out.split()[0] == url and "holding lock 'job'" in out.err


def test_options_after_name_without_double_dash_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["lock", "job", "--url", memory_url(), "true"]) == 2
    assert "'--'" in one_error_line(capsys.readouterr().err, "ConfigError")


# -- an explicit backend --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["lock", "job", "--", sys.executable, "-c", "pass"],
        ["members", "g"],
        ["tx", "list"],
        ["tx", "show", "t1"],
        ["tx", "resolve", "t1"],
        ["tx", "recover"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_commands_on_shared_state_refuse_to_run_without_a_backend(
    argv: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out = capfd.readouterr()
    message = one_error_line(out.err, "ConfigError")
    assert "--url" in message and "$DCOORD_URL" in message and "memory://" in message
    assert out.out == ""
    # memory:// given explicitly is allowed.
    assert main([*argv[:2], "--url", memory_url(), *argv[2:]]) == 0


def test_demo_and_ring_need_no_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--accounts", "4", "--transfers", "4", "--workers", "1"]) == 0
    assert "backend: memory" in capsys.readouterr().out
    assert main(["ring", "--nodes", "a,b", "--sample", "10"]) == 0


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code", "kind", "named"),
    [
        (["members", "bad/name", "--url", "memory://"], 2, "ConfigError", "'bad/name'"),
        (["ring", "--nodes", "a,b", "--vnodes", "0"], 2, "ConfigError", "got 0"),
        (["demo", "--accounts", "1"], 2, "ConfigError", "--accounts must be >= 2, got 1"),
        (["tx", "show", "bad txid!", "--url", "memory://"], 2, "ConfigError", "'bad txid!'"),
        (["members", "g", "--url", "bogus://h"], 2, "ConfigError", "'bogus://'"),
        (
            ["lock", "job", "--url", "memory://", "--ttl", "-1", "--", "true"],
            2,
            "ConfigError",
            "ttl",
        ),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_errors_are_one_line_on_stderr_without_traceback(
    argv: list[str], code: int, kind: str, named: str
) -> None:
    done = run_dcoord(*argv)
    assert done.returncode == code, done
    assert named in one_error_line(done.stderr, kind)
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["nosuch"], "'nosuch'"),
        (["lock"], "NAME"),
        (["lock", "job", "--url", "memory://", "--bogus", "--", "true"], "--bogus"),
        (["ring", "--nodes", "a", "--vnodes", "x"], "'x'"),
    ],
    ids=lambda v: " ".join(v[:1]) if isinstance(v, list) else None,
)
def test_usage_errors_are_reported_in_the_same_format(argv: list[str], named: str) -> None:
    done = run_dcoord(*argv)
    assert done.returncode == 2
    message = one_error_line(done.stderr, "ConfigError")
    assert named in message and "--help" in message


def test_an_unreachable_backend_is_one_line_and_exit_1() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0?connect_timeout=0.5"
    done = run_dcoord("members", "g", "--url", url)
    assert done.returncode == 1
    message = one_error_line(done.stderr, "BackendUnavailable")
    assert "$DCOORD_URL" not in message  # it came from --url


def test_an_error_caused_by_dcoord_url_says_so() -> None:
    done = run_dcoord("members", "g", env={"DCOORD_URL": "bogus://h"})
    assert done.returncode == 2
    assert one_error_line(done.stderr, "ConfigError").endswith("(from $DCOORD_URL)")
    unreachable = f"redis://127.0.0.1:{free_port()}/0?connect_timeout=0.5"
    done = run_dcoord("tx", "list", env={"DCOORD_URL": unreachable})
    assert done.returncode == 1
    assert one_error_line(done.stderr, "BackendUnavailable").endswith("(from $DCOORD_URL)")


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_shows_connection_attempts_on_stderr(where: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0?connect_timeout=1"
    argv = ["-v", "members", "g", "--url", url]
    if where == "after":
        argv = ["members", "-v", "g", "--url", url]
    done = run_dcoord(*argv)
    assert done.returncode == 1
    assert re.search(r"dcoord INFO connecting to redis://127\.0\.0\.1:\d+/0", done.stderr)
    assert re.search(r"dcoord\.backend INFO connect to redis .* attempt 2 failed", done.stderr)
    quiet = run_dcoord("members", "g", "--url", url)
    assert "INFO" not in quiet.stderr


# -- dcoord lock -------------------------------------------------------------------------------


def test_lock_exit_codes_for_a_command_not_found_or_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    url = memory_url()
    done = run_dcoord("lock", "job", "--url", url, "--", str(tmp_path / "missing"))
    assert done.returncode == 127
    assert "missing" in one_error_line(done.stderr, "FileNotFoundError")
    done = run_dcoord("lock", "job", "--url", url, "--", str(script))
    assert done.returncode == 126
    assert "script.sh" in one_error_line(done.stderr, "PermissionError")
    # Negative control: the same script, executable, runs and its code is passed on.
    script.write_text("#!/bin/sh\nexit 7\n")
    script.chmod(0o755)
    assert run_dcoord("lock", "job", "--url", url, "--", str(script)).returncode == 7


def test_lock_timeout_exits_124_and_the_child_gets_no_password(
    real_backend_url: str, namespace: str
) -> None:
    show = (
        "import os, dcoord; c = dcoord.connect(); "
        "print(c.namespace, c.fence('r').admit(int(os.environ['DCOORD_FENCE']))); "
        f"print({SECRET!r} in repr(os.environ))"
    )
    argv = ["lock", "job", "--url", real_backend_url, "--namespace", namespace]
    # The caller's own DCOORD_URL (with a password) is not what the child gets.
    env = {"DCOORD_URL": f"redis://user:{SECRET}@127.0.0.1:1/0"}
    done = run_dcoord(*argv, "--timeout", "30", "--", sys.executable, "-c", show, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [namespace, "True", "False"]  # same backend and namespace
    with dcoord.connect(real_backend_url, namespace=namespace) as client:
        held = client.lock("job", ttl=30)
        assert held.acquire(timeout=10)
        done = run_dcoord(*argv, "--timeout", "0.5", "--", sys.executable, "-c", "print('ran')")
        assert done.returncode == 124
        assert "'job'" in one_error_line(done.stderr, "LockTimeout")
        assert done.stdout == ""
        held.release()


def _take_away_locks(client: dcoord.Client) -> None:
    """Delete every key of the client's namespace (Redis) or revoke their leases (etcd),
    as an operator might: whoever held a lock there has lost it."""
    backend: Any = client.backend
    if client.backend.kind == "redis":
        for key in backend.redis.scan_iter(match=backend.prefix + "*"):
            backend.redis.delete(key)
        return
    leases = {meta.lease_id for _, meta in backend.etcd.get_prefix(backend.prefix)}
    for lease in leases - {0}:
        backend.etcd.revoke_lease(lease)


def test_lock_lost_while_the_command_runs_exits_123(
    real_backend_url: str, real_backend: str, namespace: str
) -> None:
    ttl = "3" if real_backend == "etcd" else "1"  # etcd grants no lease under ~2 s
    wait = "import time; print('ready', flush=True); time.sleep(60)"
    argv = ["lock", "job", "--url", real_backend_url, "--namespace", namespace, "--ttl", ttl]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcoord", *argv, "--", sys.executable, "-c", wait],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with dcoord.connect(real_backend_url, namespace=namespace) as client:
            _take_away_locks(client)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 123, stderr
        # The lock's own warning may come first; the error is the last line.
        assert stderr.splitlines()[-1].startswith("dcoord: LockLost: lock 'job'"), stderr
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_child_url_has_neither_user_nor_password_but_keeps_the_options() -> None:
    settings = settings_from(
        f"redis://app:{SECRET}@cache:6380/2?connect_timeout=2", namespace="billing"
    )
    url = cli_lock.child_url(settings)
    assert SECRET not in url and "app" not in url
    again = settings_from(url)
    assert (again.hosts, again.database, again.namespace) == ((("cache", 6380),), "2", "billing")
    assert again.connect_timeout == 2.0
    assert cli_lock.child_url(settings_from("memory://x")) == "memory://x"


# -- tx -------------------------------------------------------------------------------------


def test_tx_show_and_resolve_agree_on_a_txid_never_logged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = memory_url()
    assert main(["tx", "show", "never-logged", "--url", url]) == 0
    assert "presumed aborted" in capsys.readouterr().out
    assert main(["tx", "resolve", "never-logged", "--url", url]) == 0
    assert capsys.readouterr().out == "aborted\n"
    shown, resolved = [], []
    assert main(["tx", "show", "never-logged", "--url", url, "--json"]) == 0
    shown.append(json.loads(capsys.readouterr().out))
    assert main(["tx", "resolve", "never-logged", "--url", url, "--json"]) == 0
    resolved.append(json.loads(capsys.readouterr().out))
    for doc in (*shown, *resolved):
        assert (doc["txid"], doc["outcome"], doc["in_log"]) == ("never-logged", "aborted", False)


def test_tx_list_and_show_print_json(capsys: pytest.CaptureFixture[str]) -> None:
    url = memory_url()
    with dcoord.connect(url) as client:
        kv = dcoord.KVParticipant(client, "kv")
        coord = client.coordinator(participants=[kv])
        with coord.transaction() as tx:
            tx.enlist("kv", {"set": {"k": 1}})
        txid = tx.txid
        coord.close()  # its background write of the acknowledgements is done then
        assert main(["tx", "list", "--url", url, "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [doc["txid"] for doc in listed] == [txid]
        assert main(["tx", "show", txid, "--url", url, "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown == listed[0]
        assert shown["outcome"] == "committed" and shown["in_log"] is True
        assert shown["participants"] == ["kv"] and shown["created"] <= time.time()
        assert main(["tx", "resolve", txid, "--url", url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {
            "txid": txid,
            "outcome": "committed",
            "in_log": True,
        }
        assert main(["tx", "recover", "--url", url, "--json"]) == 0
        recovered = json.loads(capsys.readouterr().out)
        assert recovered["clean"] is True and recovered["incomplete"] == {}


# -- ring and members ------------------------------------------------------------------------


def test_ring_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["ring", "--nodes", "a=2,b,c", "--sample", "3000", "--remove", "c", "--add", "d"]
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["keys"] == 3000 and doc["vnodes"] == 160 and doc["source"] == "sample"
    before = {n["node"]: n for n in doc["before"]["nodes"]}
    assert before["a"]["weight"] == 2 and before["a"]["ideal"] == 0.5
    assert sum(n["keys"] for n in before.values()) == 3000
    assert [m["change"] for m in doc["moves"]] == ["--remove c", "--add d"]
    assert {n["node"] for n in doc["after"]["nodes"]} == {"a", "b", "d"}
    # The text report says the same.
    assert main(argv) == 0
    text = capsys.readouterr().out
    first = doc["moves"][0]
    assert f"moved by --remove c: {first['moved']} of 3000 keys" in text
    assert f"total: {doc['total_moved']} of 3000 keys" in text


def test_members_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    url = memory_url()
    with dcoord.connect(url) as client:
        client.group("g").join("n1", weight=2, meta={"addr": "x"}, ttl=30)
        assert main(["members", "g", "--url", url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["members"] == {"n1": {"weight": 2.0, "meta": {"addr": "x"}}}
