"""Redis Sentinel on loopback: one primary, two replicas and three sentinels.

Data nodes are the harness's own redis servers (tests/servers.py: processes or containers,
same provider rules) with ``--replicaof`` for the replicas; sentinels are redis servers
run with ``--sentinel`` on a configuration file of their own, in a directory they may
write (Sentinel rewrites its file as it learns the topology). With ``tls`` every data node
and sentinel listens on TLS only (replication over TLS too); with ``password`` the data
nodes require it (and use it towards their primary) and the sentinels require it as well.

Fault helpers for the failover tests: :meth:`SentinelSet.primary` (the node the sentinels
name now), :meth:`kill_primary`, :meth:`pause_primary` / :meth:`resume` and
:meth:`wait_for_failover`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from tests.servers import (
    HOST,
    START_TIMEOUT,
    Certificates,
    ContainerServer,
    ProcessServer,
    Server,
    ServerUnavailable,
    provider,
)

SERVICE = "dcoord-primary"
# The sentinels call the primary down after this much silence, and two of three must
# agree (the quorum) before one of them promotes a replica.
DOWN_AFTER_MS = 1000
QUORUM = 2
# How long a failover may take before another sentinel retries it; also the minimum
# time between two failovers of the service (twice this), which the fault tests wait.
FAILOVER_TIMEOUT_MS = 3000
POLL = 0.05


def _sentinel_command(server: Server, conf: str) -> list[str]:
    """``redis-server CONF --sentinel`` listening on the server's port (TLS-only with tls)."""
    cmd = ["redis-server", conf, "--sentinel"]
    if server.tls is None:
        return [*cmd, "--port", str(server.port)]
    cert, key = server.tls.pair("server")
    return [
        *cmd,
        "--port",
        "0",
        "--tls-port",
        str(server.port),
        "--tls-cert-file",
        cert,
        "--tls-key-file",
        key,
        "--tls-ca-cert-file",
        server.tls.ca,
        "--tls-auth-clients",
        "yes",
        # The sentinels reach the data nodes (and each other) over TLS as well.
        "--tls-replication",
        "yes",
    ]


class _SentinelProcess(ProcessServer):
    """A sentinel process; its configuration file is ``conf``."""

    def __init__(self, conf: str, **options: Any) -> None:
        self.conf = conf
        super().__init__("redis", **options)

    def command(self, data_dir: str) -> list[str]:
        return _sentinel_command(self, self.conf)


class _SentinelContainer(ContainerServer):
    """A sentinel container; ``conf`` is at the same path inside, in a writable mount."""

    def __init__(self, conf: str, **options: Any) -> None:
        self.conf = conf  # before ContainerServer.__init__, which builds the command
        super().__init__("redis", **options)
        directory = Path(conf).parent
        # The image may run redis as its own user: it must read the file and write the
        # directory (Sentinel rewrites its file through a temporary one beside it).
        for path in (directory.parent, directory):
            path.chmod(0o777)
        Path(conf).chmod(0o666)
        self.container.with_volume_mapping(str(directory), str(directory), "rw")

    def command(self, data_dir: str) -> list[str]:
        return _sentinel_command(self, self.conf)


class SentinelSet:
    """A primary, two replicas and three sentinels watching them as ``dcoord-primary``."""

    replicas = 2
    sentinels = 3

    def __init__(
        self,
        *,
        tls: Certificates | None = None,
        password: str | None = None,
        using: str | None = None,
    ) -> None:
        self.using = using or provider()
        self.tls = tls
        self.password = password
        self.directory = Path(tempfile.mkdtemp(prefix="dcoord-sentinel-"))
        server_class = ContainerServer if self.using == "containers" else ProcessServer
        options: dict[str, Any] = {"tls": tls, "password": password}
        self.nodes: list[Server] = [
            server_class("redis", **options) for _ in range(1 + self.replicas)
        ]
        primary = self.nodes[0]
        for node in self.nodes:
            # A replica's first sync starts at once, not after the default 5 s wait for
            # more replicas to share one transfer.
            args = ["--repl-diskless-sync-delay", "0"]
            if node is not primary:
                args += ["--replicaof", HOST, str(primary.port)]
            if password is not None:
                # Every node may become a replica of another after a failover.
                args += ["--masterauth", password]
            if tls is not None:
                args += ["--tls-replication", "yes"]
            node.redis_args = tuple(args)
        sentinel_class = _SentinelContainer if self.using == "containers" else _SentinelProcess
        self.sentinel_servers: list[Server] = []
        for i in range(self.sentinels):
            conf = self.directory / f"sentinel-{i}" / "sentinel.conf"
            conf.parent.mkdir()
            conf.write_text(self._sentinel_conf(primary.port))
            self.sentinel_servers.append(sentinel_class(str(conf), **options))

    def _sentinel_conf(self, primary_port: int) -> str:
        lines = [
            f"bind {HOST}",
            f"sentinel monitor {SERVICE} {HOST} {primary_port} {QUORUM}",
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {SERVICE} 1",
        ]
        if self.password is not None:
            lines += [
                f"sentinel auth-pass {SERVICE} {self.password}",
                f"requirepass {self.password}",
                # ... and the sentinels log in to each other with it.
                f"sentinel sentinel-pass {self.password}",
            ]
        return "\n".join(lines) + "\n"

    # -- URLs ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The dcoord URL with the admin's credentials (and TLS options)."""
        return self.user_url("default", self.password)

    def user_url(self, user: str, password: str | None, **options: str) -> str:
        """The dcoord URL of ``user`` (the sentinels' password is the admin's), with
        ``min_replicas=1`` unless ``options`` say otherwise: what a deployment on
        Sentinel needs for its decisions to survive a failover (``dcoord doctor``).
        ``replica_timeout`` 0.25 s (loopback replicas answer in milliseconds) stays below
        the shortest ``request_timeout`` tests use (0.5 s), as it must."""
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if password else ""
        query = {
            "min_replicas": "1",
            "replica_timeout": "0.25",
            **(self.tls.client_options() if self.tls else {}),
        }
        query.update(options)
        if self.password is not None:
            query["sentinel_password"] = self.password
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinel_servers)
        return f"{scheme}://{auth}{hosts}/{SERVICE}/0?{urlencode(query)}"

    def confine(self, namespace: str, user: str, password: str) -> str:
        """Create ``user`` confined to ``namespace`` on every running data node (ACLs are
        not replicated, and any replica may become the primary); its URL. ACLs live in
        memory: a node killed and started again no longer has the user."""
        for node in self.nodes:
            if node.running():
                node.confine(namespace, user, password)
        return self.user_url(user, password)

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the data nodes, wait until the replicas are in sync, start the sentinels
        and wait until all of them agree on the primary and know each other."""
        self._start_all(self.nodes)
        deadline = time.monotonic() + START_TIMEOUT
        primary = self.nodes[0]
        self._poll(deadline, lambda: self._in_sync(primary), "replicas in sync with the primary")
        self._start_all(self.sentinel_servers)
        self._poll(deadline, lambda: self._sentinels_agree(primary), "sentinels in agreement")

    def _start_all(self, servers: list[Server]) -> None:
        errors: list[BaseException] = []

        def start(server: Server) -> None:
            try:
                server.start()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(s,)) for s in servers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _poll(self, deadline: float, done: Any, what: str) -> Any:
        last: object = None
        while time.monotonic() < deadline:
            try:
                found = done()
            except Exception as exc:  # a server not answering yet
                found, last = None, exc
            if found:
                return found
            time.sleep(POLL)
        logs = "\n".join(s.logs()[-1500:] for s in [*self.nodes, *self.sentinel_servers])
        raise ServerUnavailable(f"sentinel set: no {what} in time (last: {last!r}):\n{logs}")

    def _in_sync(self, primary: Server) -> bool:
        info = self._info(primary)
        replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return (
            info.get("role") == "master"
            and len(replicas) == self.replicas
            and all(r.get("state") == "online" for r in replicas)
        )

    def _sentinels_agree(self, primary: Server) -> bool:
        """Every sentinel names ``primary``, knows the others and both replicas, and has
        no failover under way (its flags say just "master")."""
        for sentinel in self.sentinel_servers:
            client = sentinel.redis_admin()
            try:
                state = client.sentinel_master(SERVICE)
            finally:
                client.close()
            if (
                int(state["port"]) != primary.port
                or state["flags"] != "master"
                or int(state["num-other-sentinels"]) != self.sentinels - 1
                or int(state["num-slaves"]) != self.replicas
            ):
                return False
        return True

    def settled(self) -> Server | None:
        """The primary, if the set is at rest: the sentinels agree on it with no failover
        under way, and both replicas are in sync with it; else None."""
        primary = self.primary()
        if self._sentinels_agree(primary) and self._in_sync(primary):
            return primary
        return None

    def save_logs(self, directory: Path) -> None:
        """Write each server's log to ``directory`` (a container's: its tail)."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, servers in (("node", self.nodes), ("sentinel", self.sentinel_servers)):
            for server in servers:
                text = (
                    server.log_path.read_text(errors="replace")
                    if isinstance(server, ProcessServer) and server.log_path.exists()
                    else server.logs()
                )
                (directory / f"{name}-{server.port}.log").write_text(text)

    def stop(self) -> None:
        """Stop every server started (also after a failed start) and remove the files."""
        for server in [*self.sentinel_servers, *self.nodes]:
            with contextlib.suppress(Exception):
                server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SentinelSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults ----------------------------------------------------------------------

    def _ask(self, server: Server, *command: str) -> Any:
        client = server.redis_admin()
        try:
            return client.execute_command(*command)
        finally:
            client.close()

    def _info(self, node: Server) -> dict[str, Any]:
        client = node.redis_admin()
        try:
            info: dict[str, Any] = client.info("replication")
            return info
        finally:
            client.close()

    def _named(self) -> list[int]:
        """The primary's port as each answering sentinel names it now."""
        named = []
        for sentinel in self.sentinel_servers:
            with contextlib.suppress(Exception):
                reply = self._ask(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                named.append(int(reply[1]))
        return named

    def node(self, port: int) -> Server:
        """The data node listening on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def primary(self) -> Server:
        """The data node that a majority of the sentinels name as the primary now."""
        named = self._named()
        for port in set(named):
            if named.count(port) >= QUORUM:
                return self.node(port)
        raise ServerUnavailable(f"the sentinels do not agree on a primary: ports {named}")

    def kill_primary(self) -> Server:
        """SIGKILL (or container kill) the current primary; return it."""
        old = self.primary()
        old.kill()
        return old

    def pause_primary(self) -> Server:
        """SIGSTOP (or docker pause) the current primary; return it (see :meth:`resume`)."""
        old = self.primary()
        old.pause()
        return old

    def resume(self, node: Server) -> None:
        """Let a paused node run again (the sentinels then demote it, if it was replaced)."""
        node.resume()

    def wait_for_failover(self, old: Server, timeout: float = 30.0) -> Server:
        """Wait until a majority of the sentinels name another node than ``old`` and that
        node says it is a primary; return it."""

        def promoted() -> Server | None:
            named = self._named()
            for port in set(named):
                if port != old.port and named.count(port) >= QUORUM:
                    node = self.node(port)
                    if self._info(node).get("role") == "master":
                        return node
            return None

        found: Server = self._poll(time.monotonic() + timeout, promoted, "failover")
        return found

    def rejoin(self, node: Server, timeout: float = 30.0) -> None:
        """Heal a killed or paused primary: wait until the sentinels promoted another node
        (the old one still down, so the failover is certain), bring it back (start or
        resume) and wait until the set is at rest again (:meth:`settled`): the next fault
        then starts from a primary with two replicas in sync and idle sentinels."""
        self.wait_for_failover(node, timeout)
        if node.running():
            node.resume()
        else:
            node.start()
        self.wait_for_replica(node, timeout)
        self._poll(time.monotonic() + timeout, self.settled, "set at rest after a failover")

    def wait_for_replica(self, node: Server, timeout: float = 30.0) -> None:
        """Wait until ``node`` (an old primary, running again) is a replica in sync."""

        def synced() -> bool:
            info = self._info(node)
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        self._poll(time.monotonic() + timeout, synced, f"node {node.port} as a synced replica")
