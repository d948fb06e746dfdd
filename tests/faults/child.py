"""Helpers for the child processes the fault tests start and talk to over stdout."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable


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
