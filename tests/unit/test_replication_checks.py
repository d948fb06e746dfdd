"""How replication is judged: the decision log's durability problem and ``dcoord doctor``'s
replication check, from what was read (pure: no server)."""

from __future__ import annotations

import pytest

from dcoord.backends.redis.persistence import Persistence, ReplicationSetup, log_problem
from dcoord.doctor import _redis_replication


def found(
    topology: str,
    replicas: int,
    *,
    min_replicas: int = 0,
    server: int | None = 0,
    role: str = "master",
) -> Persistence:
    return Persistence(
        appendonly="yes",
        appendfsync="always",
        maxmemory_policy="noeviction",
        replication=ReplicationSetup(
            topology=topology,
            role=role,
            connected_replicas=replicas,
            min_replicas_to_write=server,
            min_replicas=min_replicas,
        ),
    )


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_failover_topology_without_min_replicas_is_a_log_problem_naming_the_option(
    topology: str,
) -> None:
    problem = log_problem(found(topology, 2))
    assert problem is not None and "min_replicas" in problem and topology in problem
    assert log_problem(found(topology, 2, min_replicas=1)) is None


def test_single_server_needs_no_min_replicas_for_the_log() -> None:
    assert log_problem(found("single", 0)) is None
    assert log_problem(found("single", 1)) is None  # nothing promotes its replica by itself


def test_doctor_reports_the_whole_replication_set_up() -> None:
    check = _redis_replication(found("sentinel", 2, min_replicas=1, server=1))
    assert check.status == "pass"
    for part in (
        "sentinel",
        "role master",
        "2 connected replica(s)",
        "min-replicas-to-write 1 (server)",
        "min_replicas 1 (client)",
    ):
        assert part in check.detail


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        (found("single", 0), "info", "no replicas"),
        (found("single", 1), "fail", "min-replicas-to-write"),
        (found("single", 1, server=1), "pass", ""),
        (found("single", 1, min_replicas=1), "pass", ""),
        (found("sentinel", 2), "fail", "min_replicas=1"),
        (found("sentinel", 2, server=1), "fail", "min_replicas=1"),  # decisions need WAIT
        (found("sentinel", 0, min_replicas=0), "fail", "min_replicas=1"),
        (found("sentinel", 1, min_replicas=2), "fail", "lower the URL option min_replicas"),
        (found("sentinel", 2, role="slave"), "fail", "primary"),
        (found("cluster", 1, min_replicas=1, server=None), "pass", "unreadable"),
    ],
)
def test_doctor_replication_verdicts(case: Persistence, status: str, words: str) -> None:
    check = _redis_replication(case)
    assert check.status == status, check
    assert words in check.detail + check.hint


def test_doctor_replication_unreadable_is_a_failure_with_a_hint() -> None:
    check = _redis_replication("CONFIG GET refused; INFO refused")
    assert check.status == "fail" and "INFO" in check.hint
