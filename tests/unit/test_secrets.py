"""No password reaches a ConfigError text, a Settings repr or a printable URL."""

from __future__ import annotations

import os
from unittest import mock
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dcoord
from dcoord.config import parse_url, settings_from

# Every character but surrogates (not valid in a URL string passed on); the prefix keeps
# a one-letter password from matching some other part of a message by chance.
PASSWORDS = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=24).map(
    lambda text: "Pw" + text
)
# Special characters of URLs, alone and mixed.
SPECIAL = st.text(st.sampled_from("/?#@:%&=+ ;[]\n\u00e9\u2603\U0001f511"), min_size=1).map(
    lambda text: "Pw" + text
)
EXISTING_FILE = os.path.abspath(__file__)

# Bad URLs of every kind, with ``{auth}`` where the user and password go.
BAD_URLS = [
    "bogus://{auth}@127.0.0.1:6379/0",  # unknown scheme
    "redis:/{auth}@127.0.0.1:6379/0",  # not scheme://
    "redis://{auth}@bad host:6379/0",  # bad host
    "redis://{auth}@127.0.0.1:99999/0",  # bad port
    "redis://{auth}@127.0.0.1:6379/16",  # bad database
    "redis://{auth}@a:1,b:2/0",  # several hosts for redis
    "etcd://{auth}@127.0.0.1:2379/path",  # a path on etcd
    "etcd://{auth}@",  # no host
    "redis://{auth}@" + "h" * 300,  # a host name too long
    "redis://{auth}@127.0.0.1:6379/0?bogus=1",  # unknown option
    "redis://{auth}@127.0.0.1:6379/0?connect_timeout=-1",  # bad option value
    "redis://{auth}@127.0.0.1:6379/0?namespace=ns1%0A",  # bad namespace
    "redis://{auth}@127.0.0.1:6379/0?ca_cert=" + quote(EXISTING_FILE),  # TLS on redis://
]


def assert_hidden(password: str, text: str) -> None:
    for form in {password, quote(password, safe=""), quote(password)}:
        assert form not in text, f"password {form!r} in {text!r}"


@pytest.mark.parametrize("bad", BAD_URLS)
@pytest.mark.parametrize("encode", [False, True], ids=["raw", "percent-encoded"])
@settings(max_examples=40, deadline=None)
@given(password=PASSWORDS | SPECIAL)
def test_no_config_error_shows_the_password(bad: str, encode: bool, password: str) -> None:
    auth = f"app1:{quote(password, safe='') if encode else password}"
    url = bad.format(auth=auth)
    with pytest.raises(dcoord.ConfigError) as direct:
        dcoord.connect(url)
    assert_hidden(password, str(direct.value))
    assert_hidden(password, repr(direct.value))
    if "\x00" not in url:  # the environment cannot hold a NUL
        env = {"DCOORD_URL": url}
        with mock.patch.dict(os.environ, env), pytest.raises(dcoord.ConfigError) as from_env:
            settings_from()
        assert_hidden(password, str(from_env.value))
    with pytest.raises(dcoord.ConfigError) as mapped:
        settings_from({"url": url})
    assert_hidden(password, str(mapped.value))


@settings(max_examples=200, deadline=None)
@given(password=PASSWORDS | SPECIAL)
def test_percent_encoded_passwords_round_trip_and_never_print(password: str) -> None:
    s = parse_url(f"rediss://app1:{quote(password, safe='')}@cache:6380/2?connect_timeout=3")
    assert (s.username, s.password, s.hosts, s.database) == (
        "app1",
        password,
        (("cache", 6380),),
        "2",
    )
    assert s.connect_timeout == 3.0
    assert s.url == "rediss://app1:***@cache:6380/2"
    assert_hidden(password, repr(s))


@settings(max_examples=200, deadline=None)
@given(password=PASSWORDS | SPECIAL)
def test_raw_passwords_are_split_at_the_last_at_before_the_host(password: str) -> None:
    # Raw special characters: percent-encoding is what the docs ask for, but a password
    # with '/', '?' or '@' left as is must still not be split into host, path or query.
    s = parse_url(f"redis://app1:{password}@cache:6380/2?connect_timeout=3")
    assert (s.hosts, s.database, s.connect_timeout) == ((("cache", 6380),), "2", 3.0)
    assert s.username == "app1"
    if "%" not in password:
        assert s.password == password
    assert_hidden(password, repr(s) + s.url)


@pytest.mark.parametrize("where", ["--url", "DCOORD_URL"])
def test_the_cli_does_not_print_the_password(
    where: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dcoord.cli import main

    url = "redis://app1:app1-secret@127.0.0.1:99999/0"
    if where == "DCOORD_URL":
        monkeypatch.setenv("DCOORD_URL", url)
        argv = ["members", "g"]
    else:
        argv = ["members", "--url", url, "g"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "99999" in err and "app1:***@" in err
    assert "app1-secret" not in err
