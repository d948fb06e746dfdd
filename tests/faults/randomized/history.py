"""The history of a run: every operation and every fault, with monotonic times.

Each worker (a process, or a thread on the memory backend) appends JSON lines to a file
of its own, one ``write(2)`` per line, so a worker killed with SIGKILL leaves at most its
last line torn (the merge skips it) and never corrupts another worker's file. An
operation is two lines, its *invoke* and its *completion*; an invoke with no completion
(the worker died, or never heard back) merges as ``unknown`` — like a timeout, it may or
may not have taken effect.

Times are ``time.monotonic()``: CLOCK_MONOTONIC is one clock for every process on the
machine, so times from different workers compare.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import dcoord

OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
RESULTS = (OK, FAIL, UNKNOWN)
NEVER = math.inf  # completion time of an operation that never completed

# Errors that mean "the operation did not happen" (a definite failure). Anything else
# that escapes an operation leaves its outcome unknown.
DEFINITE_FAILURES: tuple[type[BaseException], ...] = (
    dcoord.LockTimeout,
    dcoord.LockNotOwned,
    dcoord.TransactionAborted,
)


@dataclass
class Op:
    """One operation by one process, from invoke to completion."""

    process: str
    id: int
    f: str
    value: Any
    invoke: float
    complete: float = NEVER
    result: str = UNKNOWN
    out: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == OK

    def overlaps(self, start: float, end: float) -> bool:
        return self.invoke <= end and start <= self.complete

    def describe(self) -> str:
        done = "never" if self.complete == NEVER else f"{self.complete:.3f}"
        err = f" ({self.error})" if self.error else ""
        return (
            f"{self.process}#{self.id} {self.f}({self.value!r}) -> {self.result} {self.out!r}{err}"
            f" [{self.invoke:.3f} .. {done}]"
        )


@dataclass
class Fault:
    """One fault the nemesis injected, from start to heal."""

    kind: str
    target: str
    start: float
    end: float = NEVER
    detail: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        end = "never healed" if self.end == NEVER else f"{self.end - self.start:.2f} s"
        return f"{self.kind} {self.target} at {self.start:.3f} for {end} {self.detail or ''}"


class Handle:
    """An invoked operation; complete it once with :meth:`ok`, :meth:`fail` or :meth:`unknown`.

    As a context manager, an exception completes it: a definite failure (LockTimeout,
    LockNotOwned, TransactionAborted) as ``fail`` and is swallowed, anything else as
    ``unknown`` and propagates (a BackendUnavailable is swallowed too: a worker carries on
    after an operation of unknown outcome, as an application would).
    """

    def __init__(self, recorder: Recorder, op_id: int, f: str) -> None:
        self._recorder = recorder
        self._id = op_id
        self._f = f
        self.result: str | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def _complete(self, result: str, out: Any, error: str | None) -> None:
        if self.result is None:
            self.result = result
            self._recorder.write(
                {
                    "type": result,
                    "i": self._id,
                    "f": self._f,
                    "out": out,
                    "err": error,
                    "t": time.monotonic(),
                }
            )

    def ok(self, out: Any = None) -> None:
        self._complete(OK, out, None)

    def fail(self, out: Any = None, error: str | None = None) -> None:
        self._complete(FAIL, out, error)

    def unknown(self, error: str | None = None) -> None:
        self._complete(UNKNOWN, None, error)

    def __enter__(self) -> Handle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None:
            if not self.done:
                self.ok()
            return False
        text = f"{type(exc).__name__}: {exc}"[:300]
        if isinstance(exc, DEFINITE_FAILURES):
            self.fail(error=text)
            return True
        self.unknown(text)
        return isinstance(exc, dcoord.BackendUnavailable)


class Recorder:
    """Appends one process's events to its own JSON-lines file."""

    def __init__(self, path: Path, process: str) -> None:
        self.path = path
        self.process = process
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._ids = iter(range(1, 1 << 62))
        self._lock = threading.Lock()

    def write(self, event: dict[str, Any]) -> None:
        event["p"] = self.process
        line = (json.dumps(event, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)

    def invoke(self, f: str, value: Any = None) -> Handle:
        with self._lock:
            op_id = next(self._ids)
        self.write({"type": "invoke", "i": op_id, "f": f, "v": value, "t": time.monotonic()})
        return Handle(self, op_id, f)

    def fault(
        self, phase: str, kind: str, target: str, *, at: float | None = None, **detail: Any
    ) -> None:
        """Record the start or the end (``phase``) of a fault, ``at`` a time (default: now)."""
        t = time.monotonic() if at is None else at
        self.write(
            {"type": "fault", "phase": phase, "kind": kind, "target": target, "t": t}
            | ({"detail": detail} if detail else {})
        )

    def meta(self, **fields: Any) -> None:
        self.write({"type": "meta", **fields})

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class History:
    ops: list[Op]
    faults: list[Fault]
    meta: dict[str, Any]

    def by_f(self, *names: str) -> list[Op]:
        return [op for op in self.ops if op.f in names]

    def processes(self) -> list[str]:
        return sorted({op.process for op in self.ops})


def last_event(path: Path) -> dict[str, Any] | None:
    """The last complete event of a history file (cheap: reads only its tail)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = fh.read().split(b"\n")
    except FileNotFoundError:
        return None
    for raw in reversed(lines[:-1]):  # the first may be cut by the seek: it fails to parse
        try:
            return dict(json.loads(raw))
        except ValueError:
            continue
    return None


def _events(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                return  # torn last line of a killed writer
            yield json.loads(raw)


def merge(directory: Path) -> History:
    """Merge every ``*.jsonl`` file in ``directory`` into one :class:`History`."""
    ops: dict[tuple[str, int], Op] = {}
    faults: list[Fault] = []
    open_faults: dict[tuple[str, str], Fault] = {}
    meta: dict[str, Any] = {}
    for path in sorted(directory.glob("*.jsonl")):
        for event in _events(path):
            kind = event["type"]
            if kind == "invoke":
                key = (event["p"], event["i"])
                ops[key] = Op(event["p"], event["i"], event["f"], event["v"], event["t"])
            elif kind in RESULTS:
                op = ops[(event["p"], event["i"])]
                op.result, op.complete = kind, event["t"]
                op.out, op.error = event["out"], event["err"]
            elif kind == "fault":
                key = (event["kind"], event["target"])
                if event["phase"] == "start":
                    fault = Fault(event["kind"], event["target"], event["t"])
                    fault.detail = event.get("detail", {})
                    open_faults[key] = fault
                    faults.append(fault)
                elif key in open_faults:
                    fault = open_faults.pop(key)
                    fault.end = event["t"]
                    fault.detail.update(event.get("detail", {}))
            elif kind == "meta":
                meta.update({k: v for k, v in event.items() if k not in ("type", "p")})
    return History(
        ops=sorted(ops.values(), key=lambda op: (op.invoke, op.process, op.id)),
        faults=sorted(faults, key=lambda fault: fault.start),
        meta=meta,
    )
