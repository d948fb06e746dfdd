"""The driver registry: a backend is one package plus one registration.

A toy driver (test-only: the memory backend under another kind, with host URLs) shows
that connect() reaches a driver by its scheme alone, with no if-chain to extend.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

import dcoord
from dcoord.backends import registry
from dcoord.backends.memory import MemoryBackend
from dcoord.config import SCHEMES, parse_url
from dcoord.scheduler import Scheduler


class ToyBackend(MemoryBackend):
    """The memory backend under the kind ``toy``; its store is the URL's path."""

    kind = "toy"


def _toy_path(url: registry.UrlParts) -> registry.Location:
    name = url.path.strip("/")
    if not name:
        raise dcoord.ConfigError(f"a toy:// URL names its store, in {url.shown}")
    return registry.Location(database=name)


TOY = registry.Driver(
    kind="toy",
    schemes=(registry.Scheme("toy", multi_host=True), registry.Scheme("toys", tls=True)),
    factory=f"{__name__}:ToyBackend",
    capabilities=registry.Capabilities(persistent=False, primitives=frozenset({"kv", "locks"})),
    default_port=7000,
    parse_path=_toy_path,
    format_path=lambda settings: f"/{settings.database}",
)


@pytest.fixture
def toy() -> Iterator[registry.Driver]:
    registry.register(TOY)
    try:
        yield TOY
    finally:
        registry.unregister(TOY.kind)


def test_connect_reaches_a_registered_driver_by_its_scheme(toy: registry.Driver) -> None:
    with dcoord.connect("toy://a,b:7001/store-1") as client:
        assert isinstance(client.backend, ToyBackend)
        assert client.settings.hosts == (("a", 7000), ("b", 7001))  # the driver's port
        assert client.url == "toy://a:7000,b:7001/store-1"
        assert client.ping().kind == "toy"
        with client.lock("job", ttl=5) as lock:
            assert lock.fence >= 1
    assert SCHEMES["toys"] == ("toy", True, "single")


def test_the_drivers_url_hook_and_scheme_rules_apply(toy: registry.Driver) -> None:
    with pytest.raises(dcoord.ConfigError, match="names its store"):
        parse_url("toy://h")
    # toys:// takes one host: the message points to the scheme that takes several.
    with pytest.raises(dcoord.ConfigError, match="exactly one host, got 'a,b'"):
        parse_url("toys://a,b/s")


def test_a_primitive_the_driver_lacks_is_refused_by_name(toy: registry.Driver) -> None:
    with dcoord.connect("toy://h/s2") as client:
        with pytest.raises(dcoord.ConfigError, match="no groups; it provides kv, locks"):
            client.group("g")
        client.fence("r")  # negative control: fences are part of the lock store


def test_an_unknown_scheme_lists_the_registered_ones(toy: registry.Driver) -> None:
    with pytest.raises(dcoord.ConfigError) as info:
        dcoord.connect("nope://h")
    message = str(info.value)
    assert "'nope://'" in message
    for scheme in (*SCHEMES, "toy", "toys"):
        assert f"{scheme}://" in message


def test_unregistered_drivers_are_gone() -> None:
    registry.register(TOY)
    registry.unregister(TOY.kind)
    with pytest.raises(dcoord.ConfigError, match="unknown URL scheme 'toy://'") as info:
        parse_url("toy://h/s")
    assert "memory://" in str(info.value)
    assert "toy" not in SCHEMES


def test_a_taken_kind_or_scheme_is_refused(toy: registry.Driver) -> None:
    with pytest.raises(dcoord.ConfigError, match="kind 'toy' is registered already"):
        registry.register(TOY)
    clash = registry.Driver(
        kind="other",
        schemes=(registry.Scheme("redis"),),
        factory="x:y",
        capabilities=registry.Capabilities(persistent=True),
    )
    with pytest.raises(dcoord.ConfigError, match="scheme redis:// belongs to 'redis'"):
        registry.register(clash)
    assert "other" not in {d.kind for d in registry.drivers()}


def test_a_missing_extra_names_the_pip_install() -> None:
    missing = registry.Driver(
        kind="needs",
        schemes=(registry.Scheme("needs"),),
        factory="dcoord_test_absent_module.sub:Backend",
        capabilities=registry.Capabilities(persistent=True),
        extra="needs",
        extra_modules=frozenset({"dcoord_test_absent_module"}),
    )
    with pytest.raises(dcoord.ConfigError, match=r"pip install 'dcoord\[needs\]'"):
        missing.load()
    # Negative control: a module missing that is not the extra's is a bug, not config.
    broken = registry.Driver(
        kind="broken",
        schemes=(registry.Scheme("broken"),),
        factory="dcoord_test_other_module:Backend",
        capabilities=registry.Capabilities(persistent=True),
        extra="needs",
        extra_modules=frozenset({"dcoord_test_absent_module"}),
    )
    with pytest.raises(ModuleNotFoundError):
        broken.load()


def test_importing_dcoord_imports_no_driver_dependency() -> None:
    code = (
        "import sys, dcoord, dcoord.config; dcoord.config.parse_url('etcd://h'); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'redis', 'grpc', 'pyetcd'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "memory://named",
        "redis://u:pw@h:1/3",
        "rediss://h",
        "redis+sentinel://a,b:5/mymaster/2",
        "rediss+cluster://a,[::1]:7",
        "etcd://a,b:3",
    ],
)
def test_settings_url_parses_back_to_the_same_settings(url: str) -> None:
    settings = parse_url(url)
    again = parse_url(settings.url)
    assert again.url == settings.url
    assert (again.kind, again.tls, again.topology, again.hosts, again.database) == (
        settings.kind,
        settings.tls,
        settings.topology,
        settings.hosts,
        settings.database,
    )
    assert again.service == settings.service


def test_every_builtin_scheme_has_a_driver_with_a_loadable_factory() -> None:
    assert {d.kind for d in registry.drivers()} >= {"memory", "redis", "etcd"}
    for name, (kind, _tls, _topology) in SCHEMES.items():
        assert registry.driver(kind).kind == kind, name
    factory = registry.driver("memory").load()
    backend = factory(parse_url("memory://t-registry"), Scheduler())
    assert isinstance(backend, MemoryBackend)


def test_a_tls_option_on_a_plain_sentinel_url_points_to_its_tls_scheme() -> None:
    # The hint used to append "s" to the scheme: "use redis+sentinels://".
    with pytest.raises(dcoord.ConfigError, match=r"; use rediss\+sentinel://$"):
        parse_url(f"redis+sentinel://h/svc?ca_cert={__file__}")
