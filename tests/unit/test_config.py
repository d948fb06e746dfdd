"""URL and option parsing: every bad value is a ConfigError that names it."""

from __future__ import annotations

import pytest

import dcoord
from dcoord.config import parse_url, settings_from


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("bogus://x", "bogus://"),
        ("redis:/oops", "redis:/oops"),
        ("redis://h:99999", "99999"),
        ("redis://h:0", "'0'"),
        ("redis://h:port", "port"),
        ("redis://h/16", "16"),
        ("redis://h/abc", "abc"),
        ("redis://a:1,b:2", "a:1,b:2"),
        ("etcd://", "''"),
        ("etcd://h:2379/path", "/path"),
        ("etcd://h:1,,h:2", "''"),
        ("memory://?foo=1", "foo"),
        ("memory://?connect_timeout=-1", "-1"),
        ("memory://?connect_timeout=nan", "nan"),
        ("memory://?request_timeout=inf", "inf"),
        ("memory://?namespace=a%20b", "'a b'"),
        ("memory://?require_durable=maybe", "maybe"),
    ],
)
def test_bad_urls_raise_config_error_naming_the_value(url: str, named: str) -> None:
    with pytest.raises(dcoord.ConfigError) as info:
        dcoord.connect(url)
    assert named in str(info.value)
    assert isinstance(info.value, ValueError)  # ConfigError is also a ValueError


@pytest.mark.parametrize("bad", ["", "has space", "a{b}", "x" * 65, 7, "-lead"])
def test_bad_namespaces(bad: object) -> None:
    with pytest.raises(dcoord.ConfigError, match="namespace"):
        dcoord.connect("memory://", namespace=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "soon", True, 10**9])
def test_bad_timeouts(bad: object) -> None:
    with pytest.raises(dcoord.ConfigError, match="connect_timeout"):
        dcoord.connect("memory://", connect_timeout=bad)


def test_unknown_option_is_named() -> None:
    with pytest.raises(dcoord.ConfigError, match="'conect_timeout'"):
        dcoord.connect("memory://", conect_timeout=1)


def test_config_must_be_url_or_mapping() -> None:
    with pytest.raises(dcoord.ConfigError, match="42"):
        dcoord.connect(42)  # type: ignore[arg-type]


def test_redis_url_parts() -> None:
    s = parse_url("rediss://user:p%40ss@cache.internal:6380/3?connect_timeout=2")
    assert (s.kind, s.tls, s.hosts, s.username, s.password, s.database) == (
        "redis",
        True,
        (("cache.internal", 6380),),
        "user",
        "p@ss",
        "3",
    )
    assert s.connect_timeout == 2.0
    assert "p@ss" not in s.url and "p@ss" not in repr(s)
    assert s.url == "rediss://user:***@cache.internal:6380/3"


def test_etcd_url_with_several_hosts_and_default_ports() -> None:
    s = parse_url("etcd://10.0.0.1,10.0.0.2:2380,[::1]:2381")
    assert s.kind == "etcd" and not s.tls
    assert s.hosts == (("10.0.0.1", 2379), ("10.0.0.2", 2380), ("::1", 2381))
    assert s.url == "etcd://10.0.0.1:2379,10.0.0.2:2380,[::1]:2381"


def test_memory_url_names_a_store() -> None:
    assert parse_url("memory://").database == "default"
    assert parse_url("memory://tests").database == "tests"


def test_mapping_and_keywords_override_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCOORD_URL", "redis://from-env:1")
    s = settings_from({"namespace": "m", "request_timeout": 3}, request_timeout=4)
    assert s.hosts == (("from-env", 1),)  # mapping without url falls back to DCOORD_URL
    assert s.namespace == "m"
    assert s.request_timeout == 4.0


def test_cert_and_key_go_together(tmp_path: pytest.TempPathFactory) -> None:
    cert = tmp_path / "c.pem"  # type: ignore[operator]
    cert.write_text("x")
    with pytest.raises(dcoord.ConfigError, match="together"):
        parse_url(f"rediss://h?cert_file={cert}")
    with pytest.raises(dcoord.ConfigError, match="does not exist"):
        parse_url("rediss://h?ca_cert=/nonexistent/ca.pem")
