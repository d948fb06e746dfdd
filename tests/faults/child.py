"""Helpers for the child processes the fault tests start and talk to over stdout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
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

    def wait_closed(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until the stream has ended and every line is read."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed, timeout)


# Reset SIGINT to its default, then become the real child (exec keeps SIG_DFL, and Python
# then installs its KeyboardInterrupt handler; it would leave an inherited SIG_IGN alone).
_DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class DrivenChild:
    """A child process a test drives: commands on its stdin, its answers read one line at
    a time from its stdout, every wait bounded (a stuck child fails the test)."""

    lost = False
    """Whether the child reported LOST (it found what it held lost)."""

    def __init__(self, argv: list[str], *, cwd: Path, kind: str = "child") -> None:
        self.kind = kind
        # PYTHONFAULTHANDLER: a child stuck past a deadline can be sent SIGABRT (see
        # dump_stacks), and every thread's stack lands in the test's captured stderr.
        # The child starts with SIGINT at its default: a test run started in the
        # background (where the shell ignores SIGINT, and children inherit that) must
        # still be able to interrupt it.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _DEFAULT_SIGINT, *argv],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
        self._lines = LineReader(self.proc.stdout)

    def dump_stacks(self) -> None:
        """Have a stuck child print every thread's stack (on the test's stderr) and die."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(timeout=10)

    def line(self, timeout: float = 30) -> str:
        """The child's next line."""
        line = self._lines.next(timeout)
        if line is None:
            raise AssertionError(f"{self.kind} {self.proc.pid} said nothing in {timeout} s")
        self.lost |= line == "LOST"
        return line

    def expect(self, prefix: str, timeout: float = 30) -> str:
        """The child's next line that starts with ``prefix``, skipping the others."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.line(deadline - time.monotonic())
            if line.startswith(prefix):
                return line
            seen.append(line)
        raise AssertionError(f"expected {prefix!r}, got {seen}")

    def send(self, command: str) -> None:
        """Write ``command`` as one line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child."""
        self.proc.send_signal(sig)

    def stop(self) -> None:
        """Kill the child (resumed first if it was paused) and close its pipes."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._lines.wait_closed(timeout=10)  # read to the end before the pipe is closed
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
