"""Property-based tests over what callers pass in: names, keys, namespaces, URLs, payloads.

Every input either works or raises a ``DcoordError`` subclass (never a raw TypeError,
UnicodeError or server reply), quickly, and an input that is refused writes nothing.
The memory backend takes many examples; Redis and etcd a bounded number each.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcoord
from dcoord.backends.base import key_segment
from dcoord.config import settings_from
from tests.conformance.test_locks import stored_keys
from tests.participants import Voter

EXAMPLES = {"memory": 150, "redis": 25, "etcd": 25}
# Loose: a slow machine must not fail it, a retried or hanging call must.
DEADLINE = timedelta(seconds=10)

# Text of every kind (lone surrogates, control characters, very long), and non-text.
TEXT = st.text(max_size=40) | st.text(min_size=300, max_size=2000)
ODD = st.none() | st.integers() | st.floats() | st.binary(max_size=20) | st.lists(st.integers())
VALID = st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True)
NAMES = VALID | TEXT | st.sampled_from(["", " ", "a\n", "a/b", "{x}", "%", "a\ud800", "\x00"]) | ODD
NUMBERS = (
    st.floats(min_value=2.0, max_value=60.0)
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.sampled_from([math.nan, math.inf, -0.0, True])
    | st.text(max_size=5)
    | st.none()
)
TOKENS = st.integers(min_value=0, max_value=2**63) | NUMBERS
# Whatever a caller might pass as a payload or member metadata.
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
PAYLOADS = JSONISH | st.binary(max_size=20) | st.builds(object) | st.sets(st.integers())


def lock_op(client: dcoord.Client, name: Any, ttl: Any) -> None:
    lock = client.lock(name, ttl=ttl)
    if lock.acquire(timeout=0):
        lock.release()


def fence_op(client: dcoord.Client, resource: Any, token: Any, key: Any, value: Any) -> None:
    if client.settings.topology == "cluster" and isinstance(resource, str) and isinstance(key, str):
        # A Cluster refuses a value key outside the fence's slot (ConfigError): tag it
        # as docs/topologies.md asks, so valid inputs still reach the server.
        with contextlib.suppress(Exception):
            key = f"{{{key_segment(resource)}}}{key}"
    client.fence(resource).write(token, key, value)


def group_op(client: dcoord.Client, group: Any, member: Any, weight: Any, meta: Any) -> None:
    client.group(group).join(member, weight=weight, meta=meta).leave()


def twopc_op(client: dcoord.Client, name: Any, payload: Any) -> None:
    participant = Voter(name)
    with client.coordinator(participants=[participant]).transaction(timeout=10) as tx:
        tx.enlist(name, payload)


OPERATIONS: dict[str, tuple[Callable[..., None], st.SearchStrategy[tuple[Any, ...]]]] = {
    "lock": (lock_op, st.tuples(NAMES, NUMBERS)),
    "fence": (fence_op, st.tuples(NAMES, TOKENS, NAMES, st.binary(max_size=50) | PAYLOADS)),
    "group": (group_op, st.tuples(NAMES, NAMES, NUMBERS, PAYLOADS)),
    "2pc": (twopc_op, st.tuples(NAMES, PAYLOADS)),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_any_input_works_or_is_a_dcoord_error_writing_nothing(
    backend: str, connect: Callable[..., dcoord.Client], namespace: str, operation: str
) -> None:
    op, strategy = OPERATIONS[operation]
    examples = itertools.count()
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES[backend],
        deadline=DEADLINE,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )
    @given(args=strategy)
    def check(args: tuple[Any, ...]) -> None:
        # A namespace per example: an earlier example's transaction may still be
        # finishing in the background of its own.
        client = connect(namespace=f"{namespace}-{next(examples)}")
        try:
            op(client, *args)
            outcomes["worked"] += 1
        except dcoord.DcoordError as exc:
            outcomes[type(exc).__name__] += 1
            assert stored_keys(client) == [], f"a refused {args!r} wrote something"
        finally:
            client.close()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcoord.DurabilityWarning)
        check()
    # The strategies are not all refusals: valid inputs reach the server too.
    assert outcomes["worked"] > 0, outcomes


@settings(max_examples=300, deadline=DEADLINE, database=None)
@given(namespace=NAMES)
def test_any_namespace_connects_or_is_a_config_error(namespace: Any) -> None:
    try:
        client = dcoord.connect("memory://fuzz", namespace=namespace)
    except dcoord.ConfigError:
        return
    with client:
        assert client.fence("r").admit(1)


URL_PIECES = st.sampled_from(
    ["redis", "rediss", "etcd", "etcds", "memory", "bogus", "://", ":", "@", "/", "?", "#",
     "&", "=", "%", "%zz", "[", "]", "::1", "127.0.0.1", "host", "6379", "99999", "0", "16",
     "ca_cert", "namespace", "connect_timeout", "-1", "nan", ",", "\n", "\x00", "é"]
)  # fmt: skip


@settings(max_examples=500, deadline=DEADLINE, database=None)
@given(url=st.lists(URL_PIECES | st.text(max_size=8), max_size=12).map("".join) | TEXT | ODD)
def test_any_url_parses_or_is_a_config_error(url: Any) -> None:
    # Parsing only: connecting would send traffic to whatever host the text names.
    with contextlib.suppress(dcoord.ConfigError):
        settings_from(url)
