"""A three-member etcd cluster on loopback, for faults that kill one member of a quorum.

Members are the harness's own servers (tests/servers.py: processes or containers, same
provider rules) with a cluster command line; each has its own data directory, so a killed
member restarts with its log and rejoins.
"""

from __future__ import annotations

import contextlib
import threading

from tests.servers import HOST, ContainerServer, ProcessServer, Server, free_port, provider


def _member(using: str, name: str, ports: tuple[int, int], cluster: str) -> Server:
    member = (ContainerServer if using == "containers" else ProcessServer)("etcd")
    member.etcd_name, member.etcd_cluster = name, cluster
    member.port, member.peer_port = ports  # Server.__init__ picked ports of its own
    if isinstance(member, ContainerServer):
        member.container.with_command(member.command("/data"))
    return member


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
