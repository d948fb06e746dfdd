"""OpenTelemetry metrics of dcoord: every instrument is defined here.

The rest of the library calls the small functions below at the points where something
happens (a grant, a loss, a commit, a backend error); nothing else knows OpenTelemetry.

Metrics go through the OpenTelemetry *API* (``pip install 'dcoord[otel]'``) to the meter
provider the application set globally with ``opentelemetry.metrics.set_meter_provider``,
or to one given to :func:`configure`. The meter is named ``dcoord`` with the package
version. Without the API installed every function here returns at its first line; with
the API but no provider set, they return after a clock read (and ask the API again at
most once a second). OpenTelemetry is imported at the first event, not when dcoord is
imported, and a failure while recording is swallowed: metrics never break a lock or a
transaction.

Attributes (bounded cardinality): ``dcoord.backend`` (memory, redis, etcd) and
``dcoord.namespace`` on everything, ``dcoord.group`` on membership instruments,
``dcoord.outcome`` and ``error.type`` where stated. Lock names may be unbounded (one per
user or per row), so ``dcoord.lock.name`` is added only after
``configure(lock_names=True)``. Transaction ids never become attributes.
See docs/observability.md for the list of instruments.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ._version import __version__

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter, MeterProvider

    from .aio.lock import AsyncLock
    from .aio.twopc import AsyncCoordinator
    from .config import Settings
    from .lock import Lock
    from .membership import Group
    from .twopc import Coordinator, RecoveryReport

__all__ = ["METER_NAME", "configure"]

log = logging.getLogger("dcoord.metrics")

METER_NAME = "dcoord"

BACKEND = "dcoord.backend"
NAMESPACE = "dcoord.namespace"
GROUP = "dcoord.group"
LOCK_NAME = "dcoord.lock.name"
OUTCOME = "dcoord.outcome"
ERROR_TYPE = "error.type"

# Advisory buckets of OpenTelemetry's db.client.operation.duration (1 ms .. 10 s), with
# longer ones added: locks are held, and waited for, for minutes.
_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0)


class _Instruments:
    """Every dcoord instrument, made from one meter."""

    def __init__(self, meter: Meter, lock_names: bool) -> None:
        self.lock_names = lock_names
        seconds = {"unit": "s", "explicit_bucket_boundaries_advisory": _SECONDS_BUCKETS}
        self.lock_wait = meter.create_histogram(
            "dcoord.lock.wait",
            description="Time acquire() waited, by dcoord.outcome (granted, timeout)",
            **seconds,  # type: ignore[arg-type]
        )
        self.lock_held = meter.create_histogram(
            "dcoord.lock.held",
            description="Time from a grant to its release or loss",
            **seconds,  # type: ignore[arg-type]
        )
        self.lock_grants = meter.create_counter(
            "dcoord.lock.grants", unit="{grant}", description="Locks granted"
        )
        self.lock_timeouts = meter.create_counter(
            "dcoord.lock.timeouts",
            unit="{timeout}",
            description="acquire() calls that returned False (their wait ran out)",
        )
        self.lock_lost = meter.create_counter(
            "dcoord.lock.lost",
            unit="{lock}",
            description="Held locks found lost (TTL passed, renewal failed, taken over)",
        )
        self.lock_renewal_failures = meter.create_counter(
            "dcoord.lock.renewal.failures",
            unit="{failure}",
            description="Watchdog renewals that failed with an error (retried until the TTL)",
        )
        self.member_joins = meter.create_counter(
            "dcoord.membership.joins", unit="{join}", description="Members joined by this process"
        )
        self.member_leaves = meter.create_counter(
            "dcoord.membership.leaves", unit="{leave}", description="Members that left"
        )
        self.member_expiries = meter.create_counter(
            "dcoord.membership.expiries",
            unit="{expiry}",
            description="Members joined by this process that were lost (expired)",
        )
        self.group_size = meter.create_gauge(
            "dcoord.membership.size",
            unit="{member}",
            description="Live members of the group at the latest read by this process",
        )
        self.tx_commits = meter.create_counter(
            "dcoord.tx.commits", unit="{transaction}", description="Transactions committed"
        )
        self.tx_aborts = meter.create_counter(
            "dcoord.tx.aborts", unit="{transaction}", description="Transactions aborted"
        )
        self.tx_duration = meter.create_histogram(
            "dcoord.tx.duration",
            description="Latency of Transaction.commit(), by dcoord.outcome",
            **seconds,  # type: ignore[arg-type]
        )
        self.tx_recoveries = meter.create_counter(
            "dcoord.tx.recoveries", unit="{run}", description="Coordinator.recover() runs"
        )
        self.tx_recovered = meter.create_counter(
            "dcoord.tx.recovered",
            unit="{transaction}",
            description="Transactions recover() drove to their end, by dcoord.outcome",
        )
        self.tx_resolutions = meter.create_counter(
            "dcoord.tx.in_doubt.resolutions",
            unit="{transaction}",
            description="Coordinator.resolve() answers for in-doubt transactions, by outcome",
        )
        self.backend_errors = meter.create_counter(
            "dcoord.backend.errors",
            unit="{error}",
            description="Backend requests that failed, by error.type",
        )


# While dcoord follows the global provider and none is set, it asks again this often
# (values recorded before a provider is set are dropped by the API anyway).
_PROVIDER_CHECK_INTERVAL = 1.0


class _State:
    """What the recording functions consult; replaced whole by configure()."""

    def __init__(
        self, instruments: _Instruments | None, unset_provider: Callable[[], bool] | None = None
    ) -> None:
        self.instruments = instruments
        # When following the global provider: a check that the application has set none
        # yet. The API's proxy instruments would drop the values, but only after dcoord
        # built their attributes; skipping them is what makes "no provider" cost nothing.
        self.unset_provider = unset_provider
        self.next_check = 0.0


_UNLOADED = _State(None)
_state = _UNLOADED
_load_mutex = threading.Lock()
# Grant time of each held lock (monotonic), for dcoord.lock.held; only filled while on.
_granted: weakref.WeakKeyDictionary[Lock | AsyncLock, float] = weakref.WeakKeyDictionary()
_granted_mutex = threading.Lock()


def _new_state(provider: MeterProvider | None, enabled: bool, lock_names: bool) -> _State:
    if not enabled:
        return _State(None)
    try:
        from opentelemetry import metrics
    except ImportError:  # the otel extra is not installed
        return _State(None)
    if provider is not None:
        return _State(_Instruments(provider.get_meter(METER_NAME, __version__), lock_names))
    meter = metrics.get_meter(METER_NAME, __version__)
    # The API hands out a placeholder (proxy) provider until the application sets a real
    # one, perhaps already before this first event. The placeholder's class is private:
    # if it ever moves, dcoord just records through the proxy (which drops the values).
    try:
        from opentelemetry.metrics._internal import _ProxyMeterProvider
    except ImportError:
        return _State(_Instruments(meter, lock_names))
    return _State(
        _Instruments(meter, lock_names),
        lambda: isinstance(metrics.get_meter_provider(), _ProxyMeterProvider),
    )


def configure(
    *,
    meter_provider: MeterProvider | None = None,
    enabled: bool = True,
    lock_names: bool = False,
) -> None:
    """Choose where dcoord's metrics go; calling it is optional.

    By default they go to the global meter provider, from the moment (within a second)
    the application sets one with ``opentelemetry.metrics.set_meter_provider``.
    ``meter_provider`` sends them to that provider instead; ``enabled=False`` stops
    recording altogether; ``lock_names=True`` adds the ``dcoord.lock.name`` attribute to
    lock instruments (only for a bounded set of lock names: every name is a new series).
    """
    global _state
    with _load_mutex:
        _state = _new_state(meter_provider, enabled, lock_names)
    with _granted_mutex:
        _granted.clear()


def _recording() -> _Instruments | None:
    """The instruments to record with, or None when nothing would be kept (metrics off)."""
    global _state
    state = _state
    if state is _UNLOADED:
        # OpenTelemetry is imported at the first event, not when dcoord is imported.
        with _load_mutex:
            if _state is _UNLOADED:
                _state = _new_state(None, True, False)
            state = _state
    if state.instruments is None:
        return None
    if state.unset_provider is not None:
        now = time.monotonic()
        if now < state.next_check:
            return None
        if state.unset_provider():
            state.next_check = now + _PROVIDER_CHECK_INTERVAL
            return None
        state.unset_provider = None  # set once, a global provider stays
    return state.instruments


def _attributes(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    attributes = {BACKEND: settings.kind, NAMESPACE: settings.namespace}
    if extra:
        attributes.update(extra)
    return attributes


def _lock_attributes(instruments: _Instruments, lock: Lock | AsyncLock) -> dict[str, str]:
    extra = {LOCK_NAME: lock.name} if instruments.lock_names else None
    return _attributes(lock._client.settings, extra)


def _swallow(what: str, exc: Exception) -> None:
    # A broken exporter or SDK must not break a lock or a commit: log and carry on.
    log.debug("recording %s failed: %r", what, exc)


# -- locks ----------------------------------------------------------------------------


def lock_acquire(lock: Lock | AsyncLock, waited: float, granted: bool) -> None:
    """An acquire() ended after ``waited`` seconds, with a grant or without (timeout)."""
    instruments = _recording()
    if instruments is None:
        return
    try:
        attributes = _lock_attributes(instruments, lock)
        (instruments.lock_grants if granted else instruments.lock_timeouts).add(1, attributes)
        attributes[OUTCOME] = "granted" if granted else "timeout"
        instruments.lock_wait.record(waited, attributes)
        if granted:
            with _granted_mutex:
                _granted[lock] = time.monotonic()
    except Exception as exc:
        _swallow("a lock acquire", exc)


def _record_held(instruments: _Instruments, lock: Lock | AsyncLock) -> None:
    with _granted_mutex:
        since = _granted.pop(lock, None)
    if since is not None:
        instruments.lock_held.record(time.monotonic() - since, _lock_attributes(instruments, lock))


def lock_released(lock: Lock | AsyncLock) -> None:
    """The grant of ``lock`` ended by release (or close); records its hold time."""
    instruments = _recording()
    if instruments is None:
        return
    try:
        _record_held(instruments, lock)
    except Exception as exc:
        _swallow("a lock release", exc)


def lock_lost(lock: Lock | AsyncLock) -> None:
    """A held lock was found lost; its hold time ends here."""
    instruments = _recording()
    if instruments is None:
        return
    try:
        instruments.lock_lost.add(1, _lock_attributes(instruments, lock))
        _record_held(instruments, lock)
    except Exception as exc:
        _swallow("a lost lock", exc)


def lock_renewal_failed(lock: Lock | AsyncLock) -> None:
    """A watchdog renewal of ``lock`` failed with an error."""
    instruments = _recording()
    if instruments is None:
        return
    try:
        instruments.lock_renewal_failures.add(1, _lock_attributes(instruments, lock))
    except Exception as exc:
        _swallow("a renewal failure", exc)


# -- membership -----------------------------------------------------------------------


def _count_member(group: Group, instrument: str) -> None:
    instruments = _recording()
    if instruments is None:
        return
    try:
        counter = getattr(instruments, instrument)
        counter.add(1, _attributes(group.client.settings, {GROUP: group.name}))
    except Exception as exc:
        _swallow(instrument, exc)


def member_joined(group: Group) -> None:
    """A member joined ``group`` through this process."""
    _count_member(group, "member_joins")


def member_left(group: Group) -> None:
    """A member of this process left ``group``."""
    _count_member(group, "member_leaves")


def member_lost(group: Group) -> None:
    """A member of this process was lost (expired) from ``group``."""
    _count_member(group, "member_expiries")


def group_size(group: Group, size: int) -> None:
    """``group`` was read with ``size`` live members."""
    instruments = _recording()
    if instruments is None:
        return
    try:
        instruments.group_size.set(size, _attributes(group.client.settings, {GROUP: group.name}))
    except Exception as exc:
        _swallow("a group size", exc)


# -- two-phase commit -----------------------------------------------------------------


def tx_ended(coordinator: Coordinator | AsyncCoordinator, outcome: str, seconds: float) -> None:
    """A commit() ended ``committed``, ``aborted`` or ``unknown`` after ``seconds``."""
    instruments = _recording()
    if instruments is None:
        return
    try:
        attributes = _attributes(coordinator.client.settings)
        if outcome == "committed":
            instruments.tx_commits.add(1, attributes)
        elif outcome == "aborted":
            instruments.tx_aborts.add(1, attributes)
        attributes[OUTCOME] = outcome
        instruments.tx_duration.record(seconds, attributes)
    except Exception as exc:
        _swallow("a transaction", exc)


def tx_recovered(coordinator: Coordinator | AsyncCoordinator, report: RecoveryReport) -> None:
    """A recover() run ended with ``report``."""
    instruments = _recording()
    if instruments is None:
        return
    try:
        attributes = _attributes(coordinator.client.settings)
        instruments.tx_recoveries.add(1, attributes)
        for outcome, txids in (("committed", report.committed), ("aborted", report.aborted)):
            if txids:
                instruments.tx_recovered.add(len(txids), {**attributes, OUTCOME: outcome})
    except Exception as exc:
        _swallow("a recovery", exc)


def tx_resolved(coordinator: Coordinator | AsyncCoordinator, outcome: str) -> None:
    """resolve() answered ``outcome`` (committed, aborted, pending) for an in-doubt txid."""
    instruments = _recording()
    if instruments is None:
        return
    try:
        attributes = _attributes(coordinator.client.settings, {OUTCOME: outcome})
        instruments.tx_resolutions.add(1, attributes)
    except Exception as exc:
        _swallow("a resolution", exc)


# -- backends -------------------------------------------------------------------------


def backend_error(settings: Settings, error: type[BaseException]) -> None:
    """A backend request failed with an ``error`` (counted by the class's name)."""
    instruments = _recording()
    if instruments is None:
        return
    try:
        attributes = _attributes(settings, {ERROR_TYPE: error.__name__})
        instruments.backend_errors.add(1, attributes)
    except Exception as exc:
        _swallow("a backend error", exc)
