"""A three-member etcd cluster on loopback, for faults that kill one member of a quorum.

Members are the harness's own servers (tests/servers.py: processes or containers, same
provider rules) with a cluster command line; each has its own data directory, so a killed
member restarts with its log and rejoins.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from tests.servers import HOST, ContainerServer, ProcessServer, Server, free_port, provider


class _Member:
    """Mixin: the etcd command line of one member of a static cluster."""

    member: str
    cluster: str
    port: int
    peer_port: int

    def command(self, data_dir: str) -> list[str]:
        peer = f"http://{HOST}:{self.peer_port}"
        client = f"http://{HOST}:{self.port}"
        return [
            "etcd",
            "--name",
            self.member,
            "--data-dir",
            f"{data_dir}/etcd",
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            self.cluster,
            "--initial-cluster-state",
            "new",
        ]


class ProcessMember(_Member, ProcessServer):
    pass


class ContainerMember(_Member, ContainerServer):
    pass


def _member(using: str, name: str, ports: tuple[int, int], cluster: str) -> Server:
    cls: Any = ContainerMember if using == "containers" else ProcessMember
    member = cls.__new__(cls)
    member.member, member.cluster = name, cluster
    cls.__init__(member, "etcd")
    member.port, member.peer_port = ports  # Server.__init__ picked ports of its own
    if using == "containers":
        member.container.with_command(member.command("/data"))
    return member  # type: ignore[no-any-return]


class EtcdCluster:
    """Three etcd members; ``url`` names them all (the client fails over between them)."""

    size = 3

    def __init__(self, using: str | None = None) -> None:
        self.using = using or provider()
        ports = [(free_port(), free_port()) for _ in range(self.size)]
        cluster = ",".join(f"m{i}=http://{HOST}:{peer}" for i, (_, peer) in enumerate(ports))
        self.members = [_member(self.using, f"m{i}", p, cluster) for i, p in enumerate(ports)]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"{HOST}:{m.port}" for m in self.members)

    def start(self) -> None:
        """Start every member at once (each waits for a quorum before it answers)."""
        errors: list[BaseException] = []

        def start(member: Server) -> None:
            try:
                member.start()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(m,)) for m in self.members]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            self.stop()
            raise errors[0]

    def stop(self) -> None:
        for member in self.members:
            with contextlib.suppress(Exception):
                member.stop()

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
