"""What the subcommands share: options, connecting, error reports and exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, NoReturn, TextIO

from ..client import Client, connect
from ..config import DEFAULT_URL, ENV_URL
from ..errors import ConfigError, DcoordError

#: Exit codes of every command (``dcoord lock`` adds its own, see its help).
FAILURE = 1
USAGE = 2

ENV_NOTE = f"(from ${ENV_URL})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are reported like every other error."""

    def error(self, message: str) -> NoReturn:
        # argparse would print the usage and "prog: error: ..."; one format is easier to
        # read and to grep. It is bad input, hence a ConfigError and exit status 2.
        command = self.prog.removesuffix(" NAME")
        report("ConfigError", f"{self.prog}: {message}; see {command} --help")
        self.exit(USAGE)


def global_options(parser: argparse.ArgumentParser, *, backend: bool, top: bool = False) -> None:
    """``-v`` (and, for commands that use a backend, ``--url``/``--namespace``).

    They are accepted before and after the command name: the top-level parser holds the
    defaults, and the subcommands' copies default to SUPPRESS so that an option given
    before the command name is not reset by the subcommand's parser.
    """
    default: Any = None if top else argparse.SUPPRESS
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="log what dcoord does (connection attempts, waits) on stderr",
    )
    if backend:
        parser.add_argument(
            "--url",
            default=default,
            help=f"backend URL (default: ${ENV_URL}); memory:// is this process only",
        )
        parser.add_argument(
            "--namespace", default=default, help="key namespace (default: 'default')"
        )


def connect_to(
    args: argparse.Namespace, command: str, *, shared: bool = True, namespace: str | None = None
) -> Client:
    """Connect to the backend ``--url`` or ``$DCOORD_URL`` names.

    ``shared``: the command means something only on a backend other processes share
    (a lock, a group, the transaction log), so without an explicit backend it refuses
    rather than fall back to the embedded ``memory://`` of this process alone. An error
    while connecting to the ``$DCOORD_URL`` backend says that is where the URL came from.
    """
    url = args.url
    from_env = False
    if url is None:
        url = os.environ.get(ENV_URL) or None
        from_env = url is not None
    if url is None:
        if shared:
            raise ConfigError(
                f"dcoord {command} needs the backend the other processes use: give --url URL "
                f"or set ${ENV_URL} (--url memory:// for the embedded backend of this "
                "process alone)"
            )
        url = DEFAULT_URL
    try:
        return connect(url, namespace=namespace or args.namespace)
    except DcoordError as exc:
        if from_env:
            exc.add_note(ENV_NOTE)
        raise


def report(kind: str, message: str) -> None:
    """Print an error on stderr in the one format of every command."""
    print(f"dcoord: {kind}: {message}", file=sys.stderr)


def report_error(exc: BaseException) -> None:
    """Report ``exc`` (with its notes, such as where the URL came from) on one line."""
    notes = " ".join(getattr(exc, "__notes__", ()))
    report(type(exc).__name__, f"{exc} {notes}" if notes else str(exc))


def exit_code(exc: DcoordError) -> int:
    """2 for bad input or configuration (nothing was done), 1 for any other failure."""
    return USAGE if isinstance(exc, ConfigError) else FAILURE


def print_json(data: object) -> None:
    """One JSON document on one line of stdout."""
    print(json.dumps(data, sort_keys=True), flush=True)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to the sys.stderr of the moment (tests and callers may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(verbose: bool) -> None:
    """The dcoord loggers to stderr: INFO and up with ``-v``, else warnings only."""
    logger = logging.getLogger("dcoord")
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)  # main() may run more than once in a process
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
