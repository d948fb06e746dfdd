"""Helpers for the child processes the fault tests start and talk to over stdout."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import IO


def line_writer() -> Callable[[str], None]:
    """``say(line)``: write one whole line to stdout and flush it.

    Callbacks such as ``on_lost`` speak from background threads while the main thread
    reports; print() writes the text and the newline separately, so two lines could
    interleave. One write per line under a lock keeps every line whole.
    """
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    return say


class LineReader:
    """The lines a child process writes to its stdout, read by a thread of their own.

    Waiting with ``select()`` on the pipe and then calling ``readline()`` loses lines:
    readline() may pull two lines into the text buffer at once, after which the pipe has
    nothing left and select() waits out its timeout with a whole line unread. A thread
    that reads every line into a list, and a condition to wait on, has no such gap.
    """

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self.lines: list[str] = []
        self._next = 0  # the first line next() has not returned yet
        self._closed = False
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.strip())
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def next(self, timeout: float) -> str | None:
        """The next line not returned yet; None if none came within ``timeout`` s or the
        stream ended."""
        with self._cond:
            self._cond.wait_for(lambda: self._next < len(self.lines) or self._closed, timeout)
            if self._next == len(self.lines):
                return None
            self._next += 1
            return self.lines[self._next - 1]

    def find(self, prefix: str, timeout: float) -> str | None:
        """The first line so far (or within ``timeout`` s) starting with ``prefix``."""

        def found() -> str | None:
            return next((x for x in self.lines if x.startswith(prefix)), None)

        with self._cond:
            self._cond.wait_for(lambda: found() is not None or self._closed, timeout)
            return found()
