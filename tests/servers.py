"""Real Redis and etcd servers for tests and benchmarks, on loopback only.

Where a server comes from, in this order:

1. ``DCOORD_TEST_REDIS_URL`` / ``DCOORD_TEST_ETCD_URL``: servers you already run (shared;
   tests that pause or restart a server start their own instead);
2. containers through testcontainers, when a Docker engine answers;
3. local ``redis-server`` / ``etcd`` processes on free loopback ports.

``DCOORD_TEST_SERVERS=containers|processes`` forces a provider; if it cannot start a
server the caller gets :class:`ServerUnavailable` with the reason (tests fail, they do
not skip). Images are ``DCOORD_TEST_REDIS_IMAGE`` / ``DCOORD_TEST_ETCD_IMAGE`` (defaults:
the official images; ``backends/build-images.sh`` builds local ones for machines with no
registry). Containers use host networking and every server listens on 127.0.0.1.

Configuration comes from ``backends/`` (redis.conf, etcd.env), the same files
docker-compose.yml mounts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

# Ryuk (testcontainers' reaper) needs an image from a registry; our fixtures remove their
# own containers instead.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

ROOT = Path(__file__).resolve().parent.parent
REDIS_CONF = ROOT / "backends" / "redis" / "redis.conf"
ETCD_ENV = ROOT / "backends" / "etcd" / "etcd.env"
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
PROVIDERS = ("containers", "processes")


class ServerUnavailable(RuntimeError):
    """A test server could not be started; the message says why and what to do."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def etcd_settings() -> dict[str, str]:
    """The ETCD_* settings of backends/etcd/etcd.env."""
    settings = {}
    for line in ETCD_ENV.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def provider() -> str:
    """The provider to use: forced by DCOORD_TEST_SERVERS, else containers if Docker answers."""
    forced = os.environ.get("DCOORD_TEST_SERVERS", "").strip().lower()
    if forced:
        if forced not in PROVIDERS:
            raise ServerUnavailable(
                f"DCOORD_TEST_SERVERS={forced!r}: expected one of {', '.join(PROVIDERS)}"
            )
        return forced
    return "containers" if docker_answers() else "processes"


class Server:
    """One real server the test owns: start, stop, and the faults tests inject."""

    kind: str
    # An etcd server's member name and static cluster (None: a cluster of itself);
    # a multi-member cluster sets both per member.
    etcd_name = "dcoord-test"
    etcd_cluster: str | None = None

    def __init__(self, *, persistent: bool = True) -> None:
        self.persistent = persistent
        self.port = free_port()
        self.peer_port = free_port()

    @property
    def url(self) -> str:
        return f"{self.kind}://{HOST}:{self.port}"

    def command(self, data_dir: str) -> list[str]:
        """The server command line, identical for processes and containers."""
        if self.kind == "redis":
            cmd = ["redis-server", str(data_dir) + "/redis.conf", "--port", str(self.port)]
            return cmd if self.persistent else [*cmd, "--appendonly", "no"]
        peer = f"http://{HOST}:{self.peer_port}"
        client = f"http://{HOST}:{self.port}"
        return [
            "etcd",
            "--name",
            self.etcd_name,
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
            self.etcd_cluster or f"{self.etcd_name}={peer}",
        ]

    def wait_ready(self, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running():
                raise ServerUnavailable(f"{self.kind} server exited during start:\n{self.logs()}")
            try:
                self._probe()
                return
            except Exception as exc:
                last = exc
                time.sleep(0.05)
        raise ServerUnavailable(
            f"{self.kind} on {HOST}:{self.port} not ready after {START_TIMEOUT:g} s "
            f"({last!r}):\n{self.logs()}"
        )

    def _probe(self) -> None:
        if self.kind == "redis":
            import redis

            client = redis.Redis(
                host=HOST, port=self.port, socket_timeout=1, socket_connect_timeout=1
            )
            try:
                client.ping()
                # AOF rewrite in progress blocks nothing, but loading does: PING answers
                # LOADING errors until the data is in memory.
            finally:
                client.close()
        else:
            import pyetcd

            client = pyetcd.MultiEndpointEtcd3Client(
                endpoints=[pyetcd.Endpoint(HOST, self.port, secure=False, time_retry=0)], timeout=1
            )
            try:
                client.put("/dcoord-test/ready", "1")
            finally:
                client.close()

    # Provided by subclasses.
    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def pause(self) -> None:
        raise NotImplementedError

    def resume(self) -> None:
        raise NotImplementedError

    def running(self) -> bool:
        raise NotImplementedError

    def logs(self) -> str:
        raise NotImplementedError

    def restart(self) -> None:
        """Kill the server (no clean shutdown) and start it again on the same port and data."""
        self.kill()
        self.start()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProcessServer(Server):
    """A ``redis-server`` or ``etcd`` process of this machine."""

    def __init__(self, kind: str, *, persistent: bool = True) -> None:
        self.kind = kind
        super().__init__(persistent=persistent)
        binary = "redis-server" if kind == "redis" else "etcd"
        if shutil.which(binary) is None:
            package = "redis-server" if kind == "redis" else "etcd-server"
            raise ServerUnavailable(
                f"{binary} is not installed (apt-get install {package}) and no container "
                f"was used; or set DCOORD_TEST_{kind.upper()}_URL"
            )
        self.data_dir = tempfile.mkdtemp(prefix=f"dcoord-{kind}-")
        shutil.copy(REDIS_CONF, Path(self.data_dir) / "redis.conf")
        self.log_path = Path(self.data_dir) / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **(etcd_settings() if self.kind == "etcd" else {})}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(self.data_dir),
                cwd=self.data_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready(time.monotonic() + START_TIMEOUT)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None:
            self.resume()
            self._signal(signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            self.resume()
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def logs(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""


class ContainerServer(Server):
    """A container (host networking) started through testcontainers."""

    def __init__(self, kind: str, *, persistent: bool = True) -> None:
        self.kind = kind
        super().__init__(persistent=persistent)
        from testcontainers.core.container import DockerContainer

        default = "redis:7" if kind == "redis" else "gcr.io/etcd-development/etcd:v3.5.17"
        self.image = os.environ.get(f"DCOORD_TEST_{kind.upper()}_IMAGE", default)
        self.container: Any = (
            DockerContainer(self.image)
            .with_command(self.command("/data"))
            .with_kwargs(network_mode="host", working_dir="/data")
        )
        if kind == "redis":
            self.container.with_volume_mapping(str(REDIS_CONF), "/data/redis.conf", "ro")
        else:
            for key, value in etcd_settings().items():
                self.container.with_env(key, value)
        self.started = False

    def start(self) -> None:
        try:
            if not self.started:
                self.container.start()
                self.started = True
            else:
                self.container.get_wrapped_container().start()
        except Exception as exc:
            raise ServerUnavailable(
                f"could not start a {self.kind} container from image {self.image!r}: {exc}. "
                f"With no registry, build local images with backends/build-images.sh and set "
                f"DCOORD_TEST_{self.kind.upper()}_IMAGE"
            ) from exc
        self.wait_ready(time.monotonic() + START_TIMEOUT)

    def _wrapped(self) -> Any:
        wrapped = self.container.get_wrapped_container()
        wrapped.reload()
        return wrapped

    def running(self) -> bool:
        return bool(self.started and self._wrapped().status in ("running", "paused"))

    def kill(self) -> None:
        if self.running():
            wrapped = self._wrapped()
            if wrapped.status == "paused":
                wrapped.unpause()
            wrapped.kill()
            wrapped.wait(timeout=30)

    def pause(self) -> None:
        self._wrapped().pause()

    def resume(self) -> None:
        if self.running() and self._wrapped().status == "paused":
            self._wrapped().unpause()

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(Exception):
                self.resume()
            self.container.stop()  # removes the container and its volumes
            self.started = False

    def logs(self) -> str:
        with contextlib.suppress(Exception):
            out, err = self.container.get_logs()
            return str((out + err).decode(errors="replace"))[-4000:]
        return ""


def start_server(kind: str, *, persistent: bool = True, using: str | None = None) -> Server:
    """Start a dedicated server of ``kind`` ("redis" or "etcd"); the caller stops it.

    Unless a provider is forced (``using`` or DCOORD_TEST_SERVERS), a container that cannot
    start (no image, no registry) falls back to a local process.
    """
    forced = using or os.environ.get("DCOORD_TEST_SERVERS", "").strip()
    chosen = using or provider()
    if chosen == "containers" and not forced:
        try:
            return _start(kind, persistent, "containers")
        except ServerUnavailable as exc:
            warnings.warn(f"{exc}; using a local {kind} process instead", stacklevel=2)
            chosen = "processes"
    return _start(kind, persistent, chosen)


def _start(kind: str, persistent: bool, chosen: str) -> Server:
    if chosen == "containers" and not docker_answers():
        raise ServerUnavailable(
            "DCOORD_TEST_SERVERS=containers but no Docker engine answers; start one "
            "(dockerd --bridge=none --iptables=false) or use DCOORD_TEST_SERVERS=processes"
        )
    server: Server = (ContainerServer if chosen == "containers" else ProcessServer)(
        kind, persistent=persistent
    )
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server
