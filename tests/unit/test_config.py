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


@pytest.mark.parametrize("scheme", ["redis", "etcd"])
@pytest.mark.parametrize("option", ["ca_cert", "cert_file", "key_file"])
def test_tls_options_on_a_plaintext_scheme_are_refused(
    scheme: str, option: str, tmp_path: pytest.TempPathFactory
) -> None:
    pem = tmp_path / "x.pem"  # type: ignore[operator]
    pem.write_text("x")
    path = str(pem)
    pair = {"cert_file": path, "key_file": path} if option != "ca_cert" else {"ca_cert": path}
    with pytest.raises(dcoord.ConfigError, match=f"{option}.*{scheme}s://"):
        parse_url(f"{scheme}://u:pw@h", pair)
    assert parse_url(f"{scheme}s://u:pw@h", pair).tls  # negative control


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("memory://?namespace=ns1%0A", "'ns1\\n'"),
        ("redis://h:6379\n", "6379\\n"),
        ("redis://h/1\n", "1\\n"),
        ("redis://h:\u00b2", "\u00b2"),  # a digit to str.isdigit, not to int()
        ("redis://h:\u0663", "\u0663"),  # an Arabic-Indic three
        ("redis://h/\u00b2", "\u00b2"),
        ("redis://" + "a" * 1_000_000, "aaaa"),
        ("redis://" + "a" * 64 + ".example", "aaaa"),
        ("redis://a..b", "a..b"),
    ],
)
def test_values_the_old_checks_let_through(url: str, named: str) -> None:
    with pytest.raises(dcoord.ConfigError) as info:
        parse_url(url)
    assert named in str(info.value)
    assert len(str(info.value)) < 1000


def test_long_valid_host_names_are_accepted() -> None:
    host = ".".join(["a" * 63] * 3) + "." + "b" * 61  # 253 characters
    assert parse_url(f"redis://{host}:1").hosts == ((host, 1),)
    assert parse_url(f"redis://{host}.:1").hosts == ((host + ".", 1),)  # fully qualified


def test_empty_dcoord_url_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCOORD_URL", "")
    with pytest.raises(dcoord.ConfigError, match="DCOORD_URL"):
        settings_from()
    with pytest.raises(dcoord.ConfigError, match="DCOORD_URL"):
        settings_from({"namespace": "x"})
    monkeypatch.delenv("DCOORD_URL")
    assert settings_from().kind == "memory"  # negative control: unset means memory://
