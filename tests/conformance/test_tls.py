"""TLS on both server backends: a good certificate works, a bad one fails at once.

Certificates come from the session's test CA (tests/servers.py, generated with openssl):
a server certificate that expired, one for another host name, a client that trusts
another CA, a client without a certificate where the server requires one. Each is a
``ConfigError`` naming the certificate problem, raised at once: retrying gets the same
certificate refused again, so it used to end as ``BackendUnavailable`` after the whole
connect timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

import dcoord
from tests.servers import HOST, Certificates, Server

# Long, so that a retried failure is told apart from one at once without tight timing.
CONNECT_TIMEOUT = 30.0
AT_ONCE = CONNECT_TIMEOUT / 3
PASSWORD = "tls-admin-pw"


def test_a_good_certificate_and_password_connect_over_tls(
    real_backend: str,
    server_factory: Callable[..., Server],
    certificates: Certificates,
    dcoord_connect: Callable[..., dcoord.Client],
) -> None:
    # The negative control of the tests below: the same servers, the right certificates.
    server = server_factory(real_backend, persistent=False, tls=certificates, password=PASSWORD)
    assert server.url.startswith(f"{real_backend}s://")
    with dcoord_connect(server.url, namespace="tls") as client:
        lock = client.lock("l", ttl=5)
        assert lock.acquire(timeout=5)
        lock.release()
        assert PASSWORD not in repr(client) + client.url


@pytest.mark.parametrize(
    ("certificate", "client_ca", "problem"),
    [
        ("expired", None, "expired"),
        ("wrong_host", None, r"(?i)mismatch|hostname"),
        ("server", "other", r"(?i)self-signed|issuer|CERTIFICATE_VERIFY_FAILED"),
    ],
)
def test_a_refused_server_certificate_is_a_config_error_at_once(
    real_backend: str,
    server_factory: Callable[..., Server],
    certificates: Certificates,
    dcoord_connect: Callable[..., dcoord.Client],
    certificate: str,
    client_ca: str | None,
    problem: str,
) -> None:
    server = server_factory(
        real_backend, persistent=False, tls=certificates, certificate=certificate
    )
    ca = certificates.other_ca if client_ca == "other" else None
    url = server.user_url(None, None, **certificates.client_options(ca))
    started = time.monotonic()
    with pytest.raises(dcoord.ConfigError, match="TLS certificate problem") as caught:
        dcoord_connect(url, connect_timeout=CONNECT_TIMEOUT)
    assert time.monotonic() - started < AT_ONCE
    assert caught.match(problem)


def test_without_the_client_certificate_the_server_requires_is_a_config_error_at_once(
    real_backend: str,
    server_factory: Callable[..., Server],
    certificates: Certificates,
    dcoord_connect: Callable[..., dcoord.Client],
) -> None:
    server = server_factory(real_backend, persistent=False, tls=certificates)
    path = "/0" if real_backend == "redis" else ""
    started = time.monotonic()
    with pytest.raises(dcoord.ConfigError, match="client certificate"):
        dcoord_connect(
            f"{real_backend}s://{HOST}:{server.port}{path}?ca_cert={certificates.ca}",
            connect_timeout=CONNECT_TIMEOUT,
        )
    assert time.monotonic() - started < AT_ONCE
