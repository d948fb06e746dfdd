"""What ``dcoord lock`` and ``dcoord elect`` share: running a command while something is
held (a lock, a leadership), its environment, its signals and the exit codes.

Exit codes follow timeout(1), so that dcoord's own outcomes do not collide with the
command's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping
from types import FrameType
from urllib.parse import urlencode

from ..config import OPTIONS, Settings
from ..errors import ConfigError, DcoordError, LockLost, LockTimeout
from .common import USAGE, Parser, report, setup_logging

FORWARDED = (signal.SIGINT, signal.SIGTERM)

LOCK_LOST = 123
LOCK_TIMEOUT = 124
FAILED = 125
NOT_EXECUTABLE = 126
NOT_FOUND = 127


def exit_codes(lost: str, timeout: str) -> dict[int, str]:
    """Exit code -> meaning, for the help text and the docs; ``lost`` and ``timeout`` say
    what LOCK_LOST and LOCK_TIMEOUT mean for the command."""
    return {
        USAGE: "bad usage or configuration, nothing run (e.g. no --url and no $DCOORD_URL)",
        LOCK_LOST: lost,
        LOCK_TIMEOUT: timeout,
        FAILED: "dcoord itself failed (e.g. the backend is unreachable)",
        NOT_EXECUTABLE: "COMMAND was found but could not be run",
        NOT_FOUND: "COMMAND was not found",
    }


def codes_help(codes: dict[int, str]) -> str:
    """The lines of ``codes`` that end a command's description, in order of code."""
    return "\n".join(f"  {code:>3}  {meaning}" for code, meaning in sorted(codes.items()))


def exit_code(exc: DcoordError) -> int:
    """The exit code of a failure of ``dcoord lock`` / ``dcoord elect`` itself."""
    if isinstance(exc, LockTimeout):
        return LOCK_TIMEOUT
    if isinstance(exc, LockLost):
        return LOCK_LOST
    return USAGE if isinstance(exc, ConfigError) else FAILED


def child_url(settings: Settings) -> str:
    """The URL of ``settings`` for a child's ``DCOORD_URL``: no user or password, every
    option that is not the default as a query parameter (the namespace above all)."""
    url = dataclasses.replace(settings, username=None, password=None).url
    query = {k: v for k, v in settings.options.items() if v != OPTIONS[k][1]}
    return f"{url}?{urlencode(query)}" if query else url


def parse_trailing(
    command: str,
    add_options: Callable[[argparse.ArgumentParser], None],
    options: list[str],
    args: argparse.Namespace,
) -> bool:
    """Parse the options that followed NAME in ``dcoord COMMAND NAME`` into ``args``;
    False if they were refused (the parser has reported why)."""
    trailing = Parser(prog=f"dcoord {command} NAME", add_help=False)
    add_options(trailing)
    try:
        trailing.parse_args(options, namespace=args)
    except SystemExit:  # Parser.error reported it
        return False
    setup_logging(args.verbose)  # main() set it up before a -v among these was seen
    return True


def split_command(
    command: str, add_options: Callable[[argparse.ArgumentParser], None], args: argparse.Namespace
) -> list[str] | None:
    """The child command after ``--`` in ``args.command``, with the options before it
    parsed into ``args``; None if those options were refused (the parser has reported
    why). Options may follow NAME, but argparse would hand them to the top-level parser,
    so the rest is taken whole and split here."""
    rest = list(args.command)
    if "--" in rest:
        cut = rest.index("--")
        argv = rest[cut + 1 :]
        if not parse_trailing(command, add_options, rest[:cut], args):
            return None
    else:
        argv = rest
    if not argv:
        raise ConfigError(f"no command given: dcoord {command} NAME [OPTIONS] -- COMMAND [ARGS...]")
    if argv[0].startswith("-"):
        raise ConfigError(
            "options after NAME must end with '--' before the command "
            f"(dcoord {command} NAME [OPTIONS] -- COMMAND), got {argv[0]!r} as the command"
        )
    return argv


class Child:
    """The command run while something is held, stopped when that is lost.

    Create it before acquiring, pass :meth:`stop` (through the lock's or leadership's
    ``on_lost``), then :meth:`run` once held. ``grace``: seconds between SIGTERM and
    SIGKILL when it is stopped; None sends SIGTERM only.
    """

    def __init__(self, argv: list[str], *, grace: float | None = None) -> None:
        self._argv = argv
        self._grace = grace
        self._process: subprocess.Popen[bytes] | None = None
        # The process is started and the loss checked under one mutex, so that a loss
        # at any moment stops the command exactly once it exists.
        self._mutex = threading.Lock()
        #: Set once what was held is lost (by :meth:`stop`, or by the caller on release).
        self.lost = threading.Event()

    @property
    def lost_while_running(self) -> bool:
        """Whether the command was started and what was held was lost."""
        return self._process is not None and self.lost.is_set()

    def stop(self) -> None:
        """What was held is lost: stop the command if it runs (and any started later)."""
        with self._mutex:
            self.lost.set()
            if self._process is not None:
                self._terminate(self._process)

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        process.terminate()
        if self._grace is None:
            return

        def kill_late() -> None:  # the command ignored SIGTERM
            if process.poll() is None:
                process.kill()

        killer = threading.Timer(self._grace, kill_late)
        killer.daemon = True
        killer.start()

    def run(self, env: Mapping[str, str]) -> int:
        """Run the command with ``env`` added to this environment, SIGINT and SIGTERM
        forwarded to it, and return the status dcoord exits with: the command's own,
        128+N if it died of signal N, NOT_FOUND / NOT_EXECUTABLE (reported on stderr)
        if it could not be run."""
        previous = {sig: signal.getsignal(sig) for sig in FORWARDED}

        def forward(signum: int, frame: FrameType | None) -> None:
            if self._process is not None:
                self._process.send_signal(signum)

        for sig in FORWARDED:
            signal.signal(sig, forward)
        try:
            with self._mutex:
                try:
                    process = subprocess.Popen(self._argv, env={**os.environ, **env})
                except OSError as exc:
                    report(type(exc).__name__, f"cannot run {self._argv[0]!r}: {exc.strerror}")
                    return NOT_FOUND if isinstance(exc, FileNotFoundError) else NOT_EXECUTABLE
                self._process = process
                if self.lost.is_set():  # lost between acquiring and the start
                    self._terminate(process)
            code = process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 128 - code if code < 0 else code
