"""A three-member etcd cluster on loopback: ``DCOORD_TEST_TOPOLOGY=etcd3`` and the faults
that hit one member of a quorum (kill or pause a member, or the current leader).

Members are the harness's own servers (tests/servers.py: processes or containers, same
provider rules) with a cluster command line; each has its own data directory, so a killed
member restarts with its log and rejoins. With ``tls`` every member serves its clients
over TLS (peers talk plain HTTP on loopback); with ``password`` the cluster gets a
``root`` user and auth, turned on once through the first member (auth is cluster state).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any

from tests.servers import (
    HOST,
    Certificates,
    ContainerServer,
    ProcessServer,
    Server,
    ServerUnavailable,
    free_port,
    provider,
)

# Long enough for an election after a leader died (etcd.env: election timeout 1 s).
LEADER_TIMEOUT = 15.0


def _member(
    using: str, name: str, ports: tuple[int, int], cluster: str, tls: Certificates | None
) -> Server:
    # No password here: each member would try to create the root user on its first start.
    member = (ContainerServer if using == "containers" else ProcessServer)("etcd", tls=tls)
    member.etcd_name, member.etcd_cluster = name, cluster
    member.port, member.peer_port = ports  # Server.__init__ picked ports of its own
    return member


class EtcdCluster:
    """Three etcd members; ``url`` names them all (the client fails over between them)."""

    size = 3

    def __init__(
        self,
        using: str | None = None,
        *,
        tls: Certificates | None = None,
        password: str | None = None,
    ) -> None:
        self.using = using or provider()
        self.password = password
        ports = [(free_port(), free_port()) for _ in range(self.size)]
        cluster = ",".join(f"m{i}=http://{HOST}:{peer}" for i, (_, peer) in enumerate(ports))
        self.members = [_member(self.using, f"m{i}", p, cluster, tls) for i, p in enumerate(ports)]
        self._paused: set[int] = set()

    @property
    def url(self) -> str:
        """The dcoord URL of every member, with the admin's credentials and TLS options."""
        return self._hosts(self.members[0].url)

    def _hosts(self, url: str) -> str:
        """``url`` of the first member, naming every member instead."""
        every = ",".join(f"{HOST}:{m.port}" for m in self.members)
        return url.replace(f"{HOST}:{self.members[0].port}", every, 1)

    def confine(self, namespace: str, user: str, password: str) -> str:
        """Create ``user``, confined to ``namespace`` by what ``dcoord acl`` prints (auth
        is cluster state: one member applies it), and return its URL of every member."""
        return self._hosts(self._live().confine(namespace, user, password))

    def start(self) -> None:
        """Start every member at once (each waits for a quorum before it answers), then
        turn auth on if the cluster has a password."""
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
        if self.password is not None:
            first, *others = self.members
            first.password = self.password
            first._ready()  # creates root and enables auth, as for a single server
            for member in others:
                member.password, member.auth_enabled = self.password, True

    def stop(self) -> None:
        """Stop every member (also after a failed start)."""
        for member in self.members:
            with contextlib.suppress(Exception):
                member.stop()
        self._paused.clear()

    # -- faults ----------------------------------------------------------------------

    def leader(self, timeout: float = LEADER_TIMEOUT) -> Server:
        """The member that is the leader now, as a running, unpaused member reports it
        and that member confirms (waits up to ``timeout`` for an election to end)."""
        deadline = time.monotonic() + timeout
        last = "no member answered"
        while True:
            for index, member in enumerate(self.members):
                if index in self._paused or not member.running():
                    continue
                try:
                    status = self._status(member)
                except ServerUnavailable as exc:
                    last = str(exc)
                    continue
                if status["leader"] and status["leader"] == status["header"]["member_id"]:
                    return member
                last = f"{member.etcd_name} sees leader {status['leader']:x}"
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"no etcd leader within {timeout:g} s: {last}")
            time.sleep(0.05)

    def kill_leader(self) -> Server:
        """SIGKILL (container kill) the leader; return it, for ``start()`` later."""
        member = self.leader()
        member.kill()
        return member

    def pause_leader(self) -> Server:
        """Pause the leader; return it (``resume`` or :meth:`heal` it later)."""
        member = self.leader()
        self.pause(member)
        return member

    def pause(self, member: Server) -> None:
        """Pause ``member`` (SIGSTOP / docker pause); :meth:`leader` then ignores it."""
        member.pause()
        self._paused.add(self.members.index(member))

    def resume(self, member: Server) -> None:
        member.resume()
        self._paused.discard(self.members.index(member))

    def heal(self) -> None:
        """Resume every paused member and start every dead one (idempotent)."""
        for member in self.members:
            self.resume(member)
            if not member.running():
                member.start()

    @staticmethod
    def _status(member: Server) -> dict[str, Any]:
        status = json.loads(member.etcdctl("endpoint", "status", "-w", "json"))
        return dict(status[0]["Status"])

    def _live(self) -> Server:
        for index, member in enumerate(self.members):
            if index not in self._paused and member.running():
                return member
        raise ServerUnavailable("no etcd member is running")

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
