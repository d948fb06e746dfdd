"""The fault tests' line reader for child processes (tests/faults/child.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.faults.child import DrivenChild, LineReader


def test_two_lines_written_at_once_are_both_read() -> None:
    """A child that writes two lines in one write: the second must not be lost.

    The lock process tests used select() + readline(), which read both lines into the
    text buffer and then waited out the timeout for the second (a flake seen when a
    resumed holder reported WROTE and LOST at the same moment)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdout.write('WROTE\\nLOST\\n'); input()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines = LineReader(proc.stdout)
        assert lines.next(timeout=30) == "WROTE"
        assert lines.next(timeout=5) == "LOST"
        assert lines.find("LOST", timeout=0) == "LOST"
        assert lines.next(timeout=0.05) is None  # nothing more, and no hang
    finally:
        proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def test_a_driven_child_can_be_interrupted_even_if_the_test_run_ignores_sigint(
    tmp_path: Path,
) -> None:
    """A test run started in the background inherits SIGINT ignored from the shell, and
    so would its children: `dcoord leader --watch` then never saw the test's SIGINT."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = DrivenChild(
            [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT))"],
            cwd=tmp_path,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert child.line() == str(signal.default_int_handler)
    finally:
        child.stop()
