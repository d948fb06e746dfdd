"""What only a Sentinel deployment shows: the durability requirement of its decision log
and ``dcoord doctor`` talking to the primary (not a sentinel). A SentinelSet of the module's
own: these tests change ACLs and need plain (password-less) data nodes."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import dcoord
from dcoord.cli import main
from tests.topologies.sentinel import SentinelSet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelSet]:
    with SentinelSet() as started:
        started.start()
        yield started


def doctor(url: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    main(["doctor", url, "--json"])
    return {c["name"]: c for c in json.loads(capsys.readouterr().out)}


def test_require_durable_demands_min_replicas(sentinels: SentinelSet) -> None:
    """Replication is asynchronous: without min_replicas an acknowledged decision may be
    on the old primary only when the sentinels promote a replica."""
    loose = sentinels.user_url("default", None, min_replicas="0")
    with (
        dcoord.connect(loose, require_durable=True) as client,
        pytest.raises(dcoord.ConfigError, match=r"require_durable.*min_replicas"),
    ):
        client.coordinator(participants=[])
    with (
        dcoord.connect(loose) as client,
        pytest.warns(dcoord.DurabilityWarning, match="min_replicas is 0 on a redis sentinel"),
    ):
        client.coordinator(participants=[])
    # The negative control: with min_replicas=1 the same servers are durable enough.
    with dcoord.connect(sentinels.url, require_durable=True) as client, warnings.catch_warnings():
        warnings.simplefilter("error", dcoord.DurabilityWarning)
        client.coordinator(participants=[]).close()


def test_doctor_reports_replication_of_the_primary(
    sentinels: SentinelSet, capsys: pytest.CaptureFixture[str]
) -> None:
    check = doctor(sentinels.url, capsys)["replication"]
    assert check["status"] == "pass", check
    assert "sentinel topology, role master, 2 connected replica(s)" in check["detail"]
    assert "min_replicas 1 (client)" in check["detail"]
    loose = doctor(sentinels.user_url("default", None, min_replicas="0"), capsys)["replication"]
    assert loose["status"] == "fail" and "min_replicas=1" in loose["hint"]


def test_doctor_open_access_probes_the_primary_not_a_sentinel(
    sentinels: SentinelSet, capsys: pytest.CaptureFixture[str]
) -> None:
    """The data nodes let anyone in (default user, no password) though the URL has a
    user with a password: doctor must say so. A sentinel would refuse the probe's SET
    (not a sentinel command) and make the check pass for the wrong reason."""
    url = sentinels.confine("sentinelns", "app", "app-secret")
    check = doctor(url, capsys)["open access"]
    assert check["status"] == "fail", check
    assert "WITHOUT a password" in check["detail"] and "app-secret" not in json.dumps(check)
