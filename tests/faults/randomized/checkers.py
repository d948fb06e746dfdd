"""Checkers: invariants over a merged history and the final state, each able to fail.

A checker returns :class:`Violation` s; an empty list means the invariant held. Each
one reasons only from what the history proves: an ``unknown`` operation may or may not
have taken effect, so it is never counted as done nor as not done, and a comparison in
real time uses the conservative ends of the two operations' windows.

Data-losing faults (a Redis without persistence killed and restarted) are passed in as
*loss windows*: state acknowledged before such a window may be gone after it, so the
invariants that need durable state are checked only for what came after.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .history import FAIL, OK, UNKNOWN, History, Op

MAX_EXAMPLES = 5  # evidence printed per violation kind


@dataclass
class Violation:
    checker: str
    message: str
    evidence: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"[{self.checker}] {self.message}"]
        lines += [f"    {line}" for line in self.evidence]
        return "\n".join(lines)


Window = tuple[float, float]


def _epoch(t: float, losses: Sequence[Window]) -> int | None:
    """Which stretch between loss windows ``t`` falls in; None if inside a window."""
    epoch = 0
    for start, end in losses:
        if start <= t <= end:
            return None
        if t > end:
            epoch += 1
    return epoch


def _examples(items: Iterable[str]) -> list[str]:
    return list(items)[:MAX_EXAMPLES]


# -- locks --------------------------------------------------------------------------


def lock_fences(history: History) -> list[Violation]:
    """Every grant's fence is unique and larger than that of every grant before it."""
    grants = [op for op in history.by_f("acquire") if op.ok]
    violations = []
    seen: dict[int, Op] = {}
    duplicates = []
    for op in grants:
        fence = op.out["fence"]
        if fence in seen:
            duplicates.append(f"{seen[fence].describe()}  and  {op.describe()}")
        seen[fence] = op
    if duplicates:
        violations.append(
            Violation("lock-fences", f"{len(duplicates)} fences granted twice", duplicates[:5])
        )
    # Sweep by invoke time: the largest fence of every grant completed before an acquire
    # was invoked must be smaller than the fence that acquire got.
    by_complete = sorted(grants, key=lambda op: op.complete)
    backwards = []
    best: Op | None = None
    i = 0
    for op in sorted(grants, key=lambda op: op.invoke):
        while i < len(by_complete) and by_complete[i].complete < op.invoke:
            done = by_complete[i]
            if best is None or done.out["fence"] > best.out["fence"]:
                best = done
            i += 1
        if best is not None and best.out["fence"] >= op.out["fence"]:
            backwards.append(f"{best.describe()}  then  {op.describe()}")
    if backwards:
        violations.append(
            Violation(
                "lock-fences",
                f"{len(backwards)} grants got a fence not larger than an earlier grant's",
                _examples(backwards),
            )
        )
    return violations


def critical_sections(history: History) -> list[tuple[Op, Op]]:
    """(acquire, release) pairs of grants the lock confirmed: both ``ok``.

    A release that succeeds proves the grant held on the server from the acquire to the
    release (tokens are unique per grant), so the window from the acquire's completion
    to the release's invocation lies inside the server's hold of the lock.
    """
    pairs = []
    pending: dict[str, Op] = {}
    for op in history.ops:  # sorted by invoke; one process's ops are sequential
        if op.f == "acquire" and op.ok:
            pending[op.process] = op
        elif op.f == "release":
            acquire = pending.pop(op.process, None)
            if acquire is not None and op.ok and op.value["fence"] == acquire.out["fence"]:
                pairs.append((acquire, op))
    return pairs


def mutual_exclusion(history: History, losses: Sequence[Window] = ()) -> list[Violation]:
    """No two confirmed critical sections overlap in real time.

    A section that overlaps a loss window is left out: the server that confirmed it may
    have forgotten the grant since (a restart without persistence), or another server
    granted the lock too (a Sentinel failover promotes a replica while the old primary,
    or a replica promoted too early, still takes writes).
    """
    sections = sorted(
        (
            (acquire, release)
            for acquire, release in critical_sections(history)
            if not any(start <= release.complete and acquire.invoke <= end for start, end in losses)
        ),
        key=lambda pair: pair[0].complete,
    )
    overlaps = []
    widest: tuple[Op, Op] | None = None
    for acquire, release in sections:
        if widest is not None and acquire.complete < widest[1].invoke:
            overlaps.append(
                f"{widest[0].process} held fence {widest[0].out['fence']} "
                f"[{widest[0].complete:.3f} .. {widest[1].invoke:.3f}] while "
                f"{acquire.process} held fence {acquire.out['fence']} "
                f"[{acquire.complete:.3f} .. {release.invoke:.3f}]"
            )
        if widest is None or release.invoke > widest[1].invoke:
            widest = (acquire, release)
    if not overlaps:
        return []
    return [
        Violation(
            "mutual-exclusion",
            f"{len(overlaps)} critical sections overlapped another client's "
            f"(of {len(sections)} confirmed)",
            _examples(overlaps),
        )
    ]


# -- the fenced resource ------------------------------------------------------------


def _guarded(history: History) -> list[Op]:
    """Admits and guarded writes: every operation that presents a fence to the resource."""
    return history.by_f("admit", "write")


def stale_admissions(history: History, losses: Sequence[Window] = ()) -> list[Violation]:
    """No fence is admitted after a larger one was admitted (in real time), and none is
    rejected unless a larger one was presented before."""
    ops = _guarded(history)
    violations = []
    by_epoch: dict[int, list[Op]] = {}
    for op in ops:
        epoch = _epoch(op.invoke, losses)
        if op.ok and epoch is not None and _epoch(op.complete, losses) == epoch:
            by_epoch.setdefault(epoch, []).append(op)
    stale = []
    for admitted in by_epoch.values():
        by_complete = sorted(admitted, key=lambda op: op.complete)
        best: Op | None = None
        i = 0
        for op in sorted(admitted, key=lambda op: op.invoke):
            while i < len(by_complete) and by_complete[i].complete < op.invoke:
                if best is None or by_complete[i].value["fence"] > best.value["fence"]:
                    best = by_complete[i]
                i += 1
            if best is not None and best.value["fence"] > op.value["fence"]:
                stale.append(f"{best.describe()}  then  {op.describe()}")
    if stale:
        violations.append(
            Violation(
                "fence-order",
                f"{len(stale)} stale fences admitted after a larger one",
                _examples(stale),
            )
        )
    # A rejection is justified by a larger fence presented (ok or unknown) before it ended.
    presented = sorted((op for op in ops if op.result != FAIL), key=lambda op: op.invoke)
    starts = [op.invoke for op in presented]
    highest = list(itertools.accumulate((op.value["fence"] for op in presented), max))
    spurious = []
    for op in ops:
        if op.result == FAIL and op.error is None:  # rejected (not an error like a timeout)
            n = bisect.bisect_left(starts, op.complete)
            if n == 0 or highest[n - 1] <= op.value["fence"]:
                spurious.append(op.describe())
    if spurious:
        violations.append(
            Violation(
                "fence-order",
                f"{len(spurious)} fences rejected although no larger one was ever presented",
                _examples(spurious),
            )
        )
    return violations


def fenced_counter(
    history: History,
    final: dict[str, Any] | None,
    losses: Sequence[Window] = (),
    f: str = "write",
) -> list[Violation]:
    """The fenced counter is exactly the chain of its admitted increments.

    Walk back from the final value through the write that produced each value to the
    value it read: every link must be an admitted (or unknown) write with a larger fence
    than the value it replaced; the chain must reach "no value" after exactly
    ``count`` links; and every acknowledged increment that no data loss can excuse
    must be on it (one that is not was overwritten: a lost update). ``f`` names the
    write operation (``uwrite``: the same check on the unfenced control counter).
    """
    writes = history.by_f(f)
    by_value: dict[tuple[int, int], Op] = {}
    for op in writes:
        value = op.value["value"]
        by_value.setdefault((value["count"], value["fence"]), op)
    violations = []
    chain: list[Op] = []
    state = final
    while state is not None and len(chain) <= len(writes):
        producer = by_value.get((state["count"], state["fence"]))
        if producer is None:
            violations.append(
                Violation(
                    "fenced-counter",
                    f"the counter holds {state} which no recorded increment wrote",
                    _examples(w.describe() for w in chain[-3:]),
                )
            )
            break
        if producer.result == FAIL:
            violations.append(
                Violation("fenced-counter", "a rejected write took effect", [producer.describe()])
            )
        previous = producer.value["read"]
        if previous is not None and previous["fence"] >= producer.value["fence"]:
            violations.append(
                Violation(
                    "fenced-counter",
                    "admitted fences did not strictly increase along the counter's history",
                    [producer.describe()],
                )
            )
        chain.append(producer)
        state = previous
    else:
        if final is not None and len(chain) != final["count"]:
            violations.append(
                Violation(
                    "fenced-counter",
                    f"the counter is {final['count']} but {len(chain)} increments produced it",
                )
            )
    on_chain = {id(op) for op in chain}
    read_by: dict[tuple[int, int] | None, list[Op]] = {}
    for op in chain:
        read = op.value["read"]
        read_by.setdefault(None if read is None else (read["count"], read["fence"]), [op])
    lost = []
    for op in writes:
        if op.ok and id(op) not in on_chain and not any(end > op.invoke for _, end in losses):
            read = op.value["read"]
            key = None if read is None else (read["count"], read["fence"])
            winner = read_by.get(key, [])
            lost.append(
                op.describe() + (f"  overwritten by  {winner[0].describe()}" if winner else "")
            )
    if lost:
        violations.append(
            Violation(
                "fenced-counter",
                f"{len(lost)} acknowledged increments lost (final value {final})",
                _examples(lost),
            )
        )
    return violations


def unfenced_lost_updates(history: History, final: dict[str, Any] | None) -> int:
    """The negative control: increments of the unfenced counter that were overwritten.

    Counts acknowledged plain writes minus the final count (unknown writes may have
    counted too, so this is a lower bound). Expected to be > 0 under client pauses:
    without fencing, a paused holder's late write wipes out its successor's.
    """
    acknowledged = sum(1 for op in history.by_f("uwrite") if op.ok)
    return max(0, acknowledged - int((final or {}).get("count", 0)))


# -- transactions -------------------------------------------------------------------


def transactions(
    history: History,
    final: dict[str, Any],
    initial: dict[str, int],
    home: Callable[[str], str],
    marker: str,
) -> list[Violation]:
    """After healing and recovery, two-phase commit kept its promises.

    ``final`` has, per bank, its committed ``items`` (balances and the marker of every
    transaction it committed), ``in_doubt`` (prepared, unresolved) and ``reserved`` keys,
    and the ``log``: txid -> state and outcome (no record means presumed abort).

    * one outcome everywhere: a transaction committed at all its banks or at none;
    * the banks agree with the log: committed there iff the log's outcome is committed;
    * a commit acknowledged to a client is committed; an abort reported is not;
    * conservation: the total balance is unchanged, and every balance is its opening
      value plus the transfers that committed (nothing applied twice or half);
    * nothing in doubt: no prepared state, no reserved key, no unfinished record.
    """
    banks = final["banks"]
    log = final["log"]
    applied: dict[str, set[str]] = {}
    for name, bank in banks.items():
        for key in bank["items"]:
            if key.startswith(marker):
                applied.setdefault(key[len(marker) :], set()).add(name)
    found: dict[str, list[str]] = {}

    def report(kind: str, text: str) -> None:
        found.setdefault(kind, []).append(text)

    expected = dict(initial)
    known = set()
    for op in history.by_f("transfer"):
        txid = op.value["txid"]
        known.add(txid)
        enlisted = set(op.value["banks"])
        at = applied.get(txid, set())
        outcome = log.get(txid, {}).get("outcome") or "aborted (no decision)"
        if at and at != enlisted:
            report("split outcome", f"committed only at {sorted(at)}: {op.describe()}")
        if bool(at) != (outcome == "committed"):
            report(
                "banks and log disagree",
                f"log {outcome}, committed at {sorted(at)}: {op.describe()}",
            )
        if op.ok and outcome != "committed":
            report("acknowledged commit undone", f"log {outcome}: {op.describe()}")
        if op.result == FAIL and (at or outcome == "committed"):
            report("reported abort committed", f"log {outcome}: {op.describe()}")
        if at == enlisted:
            expected[op.value["from"]] -= op.value["amount"]
            expected[op.value["to"]] += op.value["amount"]
    for txid in sorted(set(applied) - known):
        report("unknown transaction applied", f"{txid} at {sorted(applied[txid])}")

    balances = {
        key: value
        for bank in banks.values()
        for key, value in bank["items"].items()
        if not key.startswith(marker)
    }
    if sum(balances.values()) != sum(initial.values()):
        report(
            "total balance changed",
            f"{sum(initial.values())} -> {sum(balances.values())}: {balances}",
        )
    for account, value in sorted(expected.items()):
        if balances.get(account) != value:
            report(
                "balance is not opening + committed transfers",
                f"{account} at {home(account)}: {balances.get(account)}, expected {value}",
            )
    for name, bank in banks.items():
        if bank["in_doubt"] or bank["reserved"]:
            report(
                "left in doubt",
                f"{name}: prepared {bank['in_doubt'][:3]}, reserved {bank['reserved'][:3]}",
            )
    unfinished = [f"{txid} {entry['state']}" for txid, entry in log.items()]
    unfinished = [text for text in unfinished if not text.endswith(("committed", "aborted"))]
    if unfinished:
        report("left in doubt", f"{len(unfinished)} unfinished log records: {unfinished[:3]}")
    return [
        Violation("transactions", f"{kind}: {len(items)}", _examples(items))
        for kind, items in found.items()
    ]


# -- liveness -----------------------------------------------------------------------


def liveness(history: History, bound: float, process: str = "liveness") -> list[Violation]:
    """After healing, the probe's operations all succeeded, each within ``bound`` s."""
    probe = [op for op in history.ops if op.process == process]
    if not probe:
        return [Violation("liveness", "the liveness probe recorded no operations")]
    slow = [
        op.describe()
        for op in probe
        if op.result != OK or op.complete - op.invoke > bound or math.isinf(op.complete)
    ]
    if slow:
        return [
            Violation(
                "liveness",
                f"{len(slow)} operations after healing failed or took over {bound:g} s",
                _examples(slow),
            )
        ]
    return []


def counts(history: History) -> dict[str, int]:
    """Operations by result, for the report."""
    tally = {OK: 0, FAIL: 0, UNKNOWN: 0}
    for op in history.ops:
        tally[op.result] += 1
    return tally


# -- elections ----------------------------------------------------------------------


def leader_terms(history: History) -> list[Violation]:
    """One leader per term, terms increase: every term read back from ``leader()`` names
    the one process elected in it, and a read never shows a term older than a read that
    completed before it began."""
    elected = {op.out["fence"]: op.process for op in history.by_f("acquire") if op.ok}
    reads = [op for op in history.by_f("leader") if op.ok and op.out is not None]
    wrong = [
        f"{op.describe()}: term {op.out['term']} was elected by {elected[op.out['term']]}"
        for op in reads
        if op.out["term"] in elected and op.out["value"] != elected[op.out["term"]]
    ]
    backwards = []
    by_complete = sorted(reads, key=lambda op: op.complete)
    best: Op | None = None
    i = 0
    for op in reads:  # sorted by invoke
        while i < len(by_complete) and by_complete[i].complete < op.invoke:
            if best is None or by_complete[i].out["term"] > best.out["term"]:
                best = by_complete[i]
            i += 1
        if best is not None and best.out["term"] > op.out["term"]:
            backwards.append(f"{best.describe()}  then  {op.describe()}")
    violations = []
    if wrong:
        violations.append(
            Violation("leader-terms", f"{len(wrong)} terms led by two processes", _examples(wrong))
        )
    if backwards:
        violations.append(
            Violation(
                "leader-terms",
                f"{len(backwards)} leader reads went back to an older term",
                _examples(backwards),
            )
        )
    return violations
