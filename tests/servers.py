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

A server may run with TLS (``tls=``: certificates :func:`make_certificates` generates with
``openssl``; clients must present a client certificate) and with auth (``password=``:
Redis' default user needs it, etcd gets a ``root`` user and auth enabled). Its ``url``
then carries the TLS options and the admin credentials, and :meth:`Server.confine` adds a
user confined to one namespace by exactly what ``dcoord acl`` prints.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from dcoord.cli.acl import etcd_rbac_commands, redis_acl_rule

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


def _ephemeral_low() -> int:
    """The first port of the range the kernel takes outgoing connections' ports from."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_RECENT: collections.deque[int] = collections.deque(maxlen=256)


def free_port() -> int:
    """A port nothing listens on, for a server to bind soon after.

    Picked below the kernel's ephemeral range: a port the kernel hands out (bind to 0)
    may be taken by any outgoing connection between this pick and the server's bind,
    and this suite opens thousands (an etcd member once failed to start: "bind:
    address already in use" on a port picked that way). Below the range only another
    listener can take it, and the pick is random among ~12,000 ports.
    """
    high = max(_ephemeral_low() - 1, 2049)
    low = max(1024, high - 12000)
    for _ in range(200):
        port = random.randint(low, high)
        if port in _RECENT:  # picked for a server of this run that may not listen yet
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue  # in use (or in TIME_WAIT): another one
        _RECENT.append(port)
        return port
    raise ServerUnavailable(f"no free port on {HOST} in {low}-{high} after 200 tries")


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


@dataclass(frozen=True)
class Certificates:
    """A test CA and the certificates it signed, as PEM files in ``directory``.

    ``server`` is valid for 127.0.0.1 and localhost; ``expired`` and ``wrong_host``
    (valid only for wrong-host.invalid) are servers' certificates a client must refuse;
    ``other_ca`` signed nothing the servers use.
    """

    directory: Path

    def path(self, name: str) -> str:
        return str(self.directory / name)

    @property
    def ca(self) -> str:
        return self.path("ca.pem")

    @property
    def other_ca(self) -> str:
        return self.path("other-ca.pem")

    def pair(self, name: str) -> tuple[str, str]:
        """(certificate, key) of ``server``, ``expired``, ``wrong_host`` or ``client``."""
        return self.path(f"{name}.pem"), self.path(f"{name}.key")

    def client_options(self, ca: str | None = None) -> dict[str, str]:
        """The URL options of a client that trusts ``ca`` (default: the test CA)."""
        cert, key = self.pair("client")
        return {"ca_cert": ca or self.ca, "cert_file": cert, "key_file": key}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path) -> Certificates:
    """Generate a CA, server and client certificates (EC keys: fast) into ``directory``."""
    if shutil.which("openssl") is None:
        raise ServerUnavailable("openssl is not installed (apt-get install openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        _openssl(
            "req",
            "-x509",
            *key,
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            "-days",
            "2",
            "-subj",
            f"/CN=dcoord test {ca}",
            cwd=directory,
        )
    # name -> (extensions, validity in days: -1 is already expired)
    leaves = {
        "server": ("subjectAltName=IP:127.0.0.1,DNS:localhost", "2"),
        "expired": ("subjectAltName=IP:127.0.0.1,DNS:localhost", "-1"),
        "wrong_host": ("subjectAltName=DNS:wrong-host.invalid", "2"),
        "client": ("subjectAltName=DNS:client", "2"),
    }
    for name, (san, days) in leaves.items():
        usage = "clientAuth" if name == "client" else "serverAuth,clientAuth"
        (directory / f"{name}.ext").write_text(f"{san}\nextendedKeyUsage={usage}\n")
        _openssl(
            "req",
            *key,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=directory,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            days,
            "-extfile",
            f"{name}.ext",
            cwd=directory,
        )
    return Certificates(directory)


class Server:
    """One real server the test owns: start, stop, and the faults tests inject."""

    kind: str
    # An etcd server's member name and static cluster (None: a cluster of itself);
    # a multi-member cluster sets both per member.
    etcd_name = "dcoord-test"
    etcd_cluster: str | None = None
    # More redis-server arguments, for a member of a topology (tests/topologies/):
    # ``--replicaof``, ``--cluster-enabled yes`` ...
    redis_args: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        persistent: bool = True,
        tls: Certificates | None = None,
        certificate: str = "server",
        password: str | None = None,
    ) -> None:
        self.persistent = persistent
        self.port = free_port()
        self.peer_port = free_port()
        self.tls = tls
        self.certificate = certificate
        self.password = password
        # etcd turns auth on after its first start (it needs a root user first).
        self.auth_enabled = self.kind == "redis" and password is not None

    @property
    def admin_user(self) -> str:
        return "default" if self.kind == "redis" else "root"

    @property
    def url(self) -> str:
        """The URL of the server with the admin's credentials (and TLS options)."""
        return self.user_url(self.admin_user, self.password)

    def user_url(self, user: str | None, password: str | None, **options: str) -> str:
        """The URL of the server as ``user`` with TLS options (or ``options``), if any."""
        scheme = f"{self.kind}s" if self.tls else self.kind
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if password and user else ""
        query = {**self.tls.client_options(), **options} if self.tls else options
        path = "/0" if self.kind == "redis" else ""
        return f"{scheme}://{auth}{HOST}:{self.port}{path}" + (
            f"?{urlencode(query)}" if query else ""
        )

    def confine(self, namespace: str, user: str, password: str) -> str:
        """Create ``user``, confined to ``namespace`` by what ``dcoord acl`` prints, and
        return its URL."""
        if self.kind == "redis":
            admin = self.redis_admin()
            try:
                admin.execute_command(*redis_acl_rule(namespace, user=user, password=password))
            finally:
                admin.close()
        else:
            for command in etcd_rbac_commands(namespace, user=user, password=password):
                self.etcdctl(*command[1:])
        return self.user_url(user, password)

    def redis_admin(self) -> Any:
        """A redis-py client of the admin (TLS and password as the server needs)."""
        import redis

        tls: dict[str, Any] = {}
        if self.tls:
            cert, key = self.tls.pair("client")
            tls = {
                "ssl": True,
                "ssl_ca_certs": self.tls.ca,
                "ssl_certfile": cert,
                "ssl_keyfile": key,
            }
        return redis.Redis(
            host=HOST,
            port=self.port,
            password=self.password,
            socket_timeout=5,
            socket_connect_timeout=5,
            **tls,
        )

    def etcdctl(self, *args: str) -> str:
        """Run ``etcdctl args`` against this server as its admin; its stdout."""
        scheme = "https" if self.tls else "http"
        cmd = ["etcdctl", f"--endpoints={scheme}://{HOST}:{self.port}", "--dial-timeout=5s"]
        if self.tls:
            cert, key = self.tls.pair("client")
            cmd += [f"--cacert={self.tls.ca}", f"--cert={cert}", f"--key={key}"]
        if self.auth_enabled:
            cmd.append(f"--user=root:{self.password}")
        done = subprocess.run(
            [*cmd, *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "ETCDCTL_API": "3"},
        )
        if done.returncode:
            raise ServerUnavailable(f"etcdctl {args[0]} {args[1]} failed: {done.stderr.strip()}")
        return done.stdout

    def _enable_etcd_auth(self) -> None:
        assert self.password is not None
        self.etcdctl("user", "add", "root", f"--new-user-password={self.password}")
        self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("auth", "enable")
        self.auth_enabled = True

    def _ready(self) -> None:
        """Wait until the server answers; turn etcd's auth on after its first start."""
        self.wait_ready(time.monotonic() + START_TIMEOUT)
        if self.password is not None and not self.auth_enabled:
            self._enable_etcd_auth()

    def command(self, data_dir: str) -> list[str]:
        """The server command line, identical for processes and containers."""
        if self.kind == "redis":
            cmd = ["redis-server", str(data_dir) + "/redis.conf", "--port", str(self.port)]
            if self.tls:
                cert, key = self.tls.pair(self.certificate)
                cmd = [
                    *cmd[:2],
                    "--port",
                    "0",
                    "--tls-port",
                    str(self.port),
                    "--tls-cert-file",
                    cert,
                    "--tls-key-file",
                    key,
                    "--tls-ca-cert-file",
                    self.tls.ca,
                    "--tls-auth-clients",
                    "yes",
                ]
            if self.password is not None:
                cmd += ["--requirepass", self.password]
            cmd += self.redis_args
            return cmd if self.persistent else [*cmd, "--appendonly", "no"]
        scheme = "https" if self.tls else "http"
        peer = f"http://{HOST}:{self.peer_port}"
        client = f"{scheme}://{HOST}:{self.port}"
        tls: list[str] = []
        if self.tls:
            cert, key = self.tls.pair(self.certificate)
            tls = [
                "--cert-file",
                cert,
                "--key-file",
                key,
                "--trusted-ca-file",
                self.tls.ca,
                "--client-cert-auth",
            ]
        return [
            "etcd",
            *tls,
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
        if self.certificate != "server":
            # A certificate clients must refuse: the probe could not verify it either.
            socket.create_connection((HOST, self.port), timeout=1).close()
        elif self.kind == "redis":
            client = self.redis_admin()
            try:
                client.ping()
                # AOF rewrite in progress blocks nothing, but loading does: PING answers
                # LOADING errors until the data is in memory.
            finally:
                client.close()
        else:
            import pyetcd

            creds = None
            if self.tls:
                cert, key = self.tls.pair("client")
                creds = pyetcd.Etcd3Client.get_secure_creds(self.tls.ca, key, cert)
            auth = {"user": "root", "password": self.password} if self.auth_enabled else {}
            client = pyetcd.MultiEndpointEtcd3Client(
                endpoints=[
                    pyetcd.Endpoint(
                        HOST, self.port, secure=bool(self.tls), creds=creds, time_retry=0
                    )
                ],
                timeout=1,
                **auth,
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


def _stopped(task: Path) -> bool:
    """Whether the thread ``/proc/PID/task/TID`` is stopped (or gone)."""
    try:
        stat = (task / "stat").read_text()
    except OSError:
        return True
    # The state is the field after the parenthesised command name (which may hold spaces).
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t", "X", "Z")


class ProcessServer(Server):
    """A ``redis-server`` or ``etcd`` process of this machine."""

    def __init__(self, kind: str, **options: Any) -> None:
        self.kind = kind
        super().__init__(**options)
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
        self._ready()

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
        """SIGSTOP the server and return once every one of its threads has stopped.

        kill() only queues the signal: a thread busy on the other core could still
        answer a request sent right after it (a ping a test expects to time out did).
        """
        self._signal(signal.SIGSTOP)
        if self.proc is None:
            return
        tasks = Path(f"/proc/{self.proc.pid}/task")
        deadline = time.monotonic() + 10
        while not all(_stopped(task) for task in tasks.iterdir()):
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"{self} did not stop within 10 s of SIGSTOP")
            time.sleep(0.001)

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

    def __init__(self, kind: str, **options: Any) -> None:
        self.kind = kind
        super().__init__(**options)
        from testcontainers.core.container import DockerContainer

        default = "redis:7" if kind == "redis" else "gcr.io/etcd-development/etcd:v3.5.17"
        self.image = os.environ.get(f"DCOORD_TEST_{kind.upper()}_IMAGE", default)
        self.container: Any = (
            DockerContainer(self.image)
            .with_command(self.command("/data"))
            .with_kwargs(network_mode="host", working_dir="/data")
        )
        if self.tls:  # the same paths inside: the command line names them
            directory = str(self.tls.directory)
            self.container.with_volume_mapping(directory, directory, "ro")
        if kind == "redis":
            self.container.with_volume_mapping(str(REDIS_CONF), "/data/redis.conf", "ro")
        else:
            for key, value in etcd_settings().items():
                self.container.with_env(key, value)
        self.started = False

    def start(self) -> None:
        try:
            if not self.started:
                # The command line as of now: a topology sets ports, member names and
                # redis_args after the constructor (which set it too, for its logs).
                self.container.with_command(self.command("/data"))
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
        self._ready()

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


def start_server(kind: str, *, using: str | None = None, **options: Any) -> Server:
    """Start a dedicated server of ``kind`` ("redis" or "etcd"); the caller stops it.

    ``options``: ``persistent`` (default True), ``tls``, ``certificate``, ``password``
    (see :class:`Server`). Unless a provider is forced (``using`` or DCOORD_TEST_SERVERS),
    a container that cannot start (no image, no registry) falls back to a local process.
    """
    forced = using or os.environ.get("DCOORD_TEST_SERVERS", "").strip()
    chosen = using or provider()
    if chosen == "containers" and not forced:
        try:
            return _start(kind, "containers", options)
        except ServerUnavailable as exc:
            warnings.warn(f"{exc}; using a local {kind} process instead", stacklevel=2)
            chosen = "processes"
    return _start(kind, chosen, options)


def _start(kind: str, chosen: str, options: dict[str, Any]) -> Server:
    if chosen == "containers" and not docker_answers():
        raise ServerUnavailable(
            "DCOORD_TEST_SERVERS=containers but no Docker engine answers; start one "
            "(dockerd --bridge=none --iptables=false) or use DCOORD_TEST_SERVERS=processes"
        )
    server: Server = (ContainerServer if chosen == "containers" else ProcessServer)(kind, **options)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server
