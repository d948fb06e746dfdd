"""Names that cannot become keys are ConfigErrors on every backend, before any I/O."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import dcoord

LONE_SURROGATE = "a\ud800b"  # a str, but no UTF-8 encoding: no backend can store it


@pytest.mark.parametrize(
    "use",
    [
        lambda c: c.lock(LONE_SURROGATE, ttl=5).acquire(timeout=0),
        lambda c: c.fence(LONE_SURROGATE).admit(1),
        lambda c: c.fence("r").write(1, LONE_SURROGATE, b"v"),
    ],
    ids=["lock name", "fence resource", "fenced key"],
)
def test_lone_surrogates_in_names_are_config_errors(
    client: dcoord.Client, use: Callable[[dcoord.Client], object]
) -> None:
    with pytest.raises(dcoord.ConfigError) as info:
        use(client)
    assert repr(LONE_SURROGATE) in str(info.value)
    assert client.fence("r").highest() is None  # nothing was written


@pytest.mark.parametrize(
    "use",
    [
        lambda c: c.group("g\n"),
        lambda c: c.coordinator().resolve("tx1\n"),
        lambda c: dcoord.KVParticipant(c, "bank\n"),
    ],
    ids=["group name", "txid", "participant name"],
)
def test_a_trailing_newline_is_not_part_of_a_valid_name(
    client: dcoord.Client, use: Callable[[dcoord.Client], object]
) -> None:
    """The name patterns are matched whole: ``$`` would also accept a final newline."""
    with pytest.raises(dcoord.ConfigError) as info:
        use(client)
    assert "\\n" in str(info.value)
