"""Turn a URL, the ``DCOORD_URL`` environment variable or a config mapping into Settings.

All validation of user configuration happens here, before any connection is made, so a
bad value fails fast with a :class:`~dcoord.errors.ConfigError` that names it.

URL forms::

    memory://[NAME]                                   embedded; NAME selects an in-process store
    redis://[user:password@]host[:port][/db]          Redis 7 (rediss:// for TLS)
    redis+sentinel://[user:password@]host[:port][,host[:port]...]/SERVICE[/db]
                                                      Redis behind Sentinel: the hosts are
                                                      the sentinels, SERVICE the primary's name
    redis+cluster://[user:password@]host[:port][,host[:port]...]
                                                      Redis Cluster: any of its nodes
    etcd://[user:password@]host[:port][,host[:port]...]   etcd v3 (etcds:// for TLS)

Options may also be given as URL query parameters (``redis://h/0?connect_timeout=2``).
The user information ends at the last ``@`` of the URL, so a password may hold ``/``, ``?``
or ``@``; percent-encode special characters anyway (and an ``@`` in an option value must
be ``%40``). No error message or repr shows the password (see :func:`redact_url`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from .backends import registry
from .backends.registry import quoted
from .errors import ConfigError

ENV_URL = "DCOORD_URL"
DEFAULT_URL = "memory://"
# scheme -> (backend kind, TLS, topology) of every registered driver (a live view). The
# topology is how the servers of one kind are arranged: one server, a Sentinel-watched
# primary with replicas, or a Redis Cluster.
SCHEMES: Mapping[str, tuple[str, bool, str]] = registry.SchemeTable()
TLS_OPTIONS = ("ca_cert", "cert_file", "key_file")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
# Patterns are used with fullmatch: "$" would also accept a trailing newline.
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(.*))?")
# ASCII digits only: str.isdigit() also accepts '²', which int() refuses.
_PORT_RE = re.compile(r"[0-9]{1,5}")
_REPLICAS_RE = re.compile(r"[0-9]{1,2}")
# DNS limits; longer names fail later, inside the resolver, with a raw UnicodeError.
MAX_HOST_NAME = 253
MAX_HOST_LABEL = 63


def positive_seconds(name: str, value: object, *, maximum: float = 86_400.0 * 365) -> float:
    """Validate a duration in seconds: a finite number in (0, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0 or seconds > maximum:
        raise ConfigError(f"{name} must be > 0 and <= {maximum:g} seconds, got {value!r}")
    return seconds


def is_utf8(text: str) -> bool:
    """Whether ``text`` has a UTF-8 encoding, as every key sent to a server needs (a str
    holding a lone surrogate, e.g. from ``os.fsdecode`` of bad bytes, has none)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _flag(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    ):
        return value.lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{name} must be a boolean, got {value!r}")


def _label(name: str, value: object) -> str:
    # Shown by `dcoord locks` and stored with every grant: one short printable line.
    if not isinstance(value, str) or not value.isprintable() or not 0 < len(value) <= 200:
        raise ConfigError(f"{name} must be 1-200 printable characters, got {value!r:.120}")
    return value


def _path(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a file path, got {value!r}")
    if not os.path.isfile(value):
        raise ConfigError(f"{name} file does not exist: {value!r}")
    return value


def _namespace(name: str, value: object) -> str:
    if not isinstance(value, str) or not _NAMESPACE_RE.fullmatch(value):
        raise ConfigError(
            f"{name} must be 1-64 characters of letters, digits, '_', '.', '-' "
            f"(starting with a letter or digit), got {value!r}"
        )
    return value


def _text(name: str, value: object) -> str:
    # May be a password: the message never shows the value.
    if not isinstance(value, str) or not value or not is_utf8(value):
        raise ConfigError(f"{name} must be a non-empty string")
    return value


def _replica_count(name: str, value: object) -> int:
    if isinstance(value, str) and _REPLICAS_RE.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 16:
        raise ConfigError(f"{name} must be a whole number 0-16, got {value!r:.120}")
    return value


def _margin(name: str, value: object) -> float:
    """A clock margin in seconds: 0 (none) up to an hour."""
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            if float(value) == 0:
                return 0.0
        except ValueError:
            pass  # positive_seconds names the bad value
    return positive_seconds(name, value, maximum=3600.0)


# Every option a user may set, with its validator and default. Backend-specific options
# are accepted by every URL scheme but only read by the backend that knows them.
OPTIONS: dict[str, tuple[Callable[[str, object], Any], Any]] = {
    "namespace": (_namespace, "default"),
    # Who this client is, beside host:pid, in the lock grants `dcoord locks` shows.
    "label": (_label, None),
    "connect_timeout": (positive_seconds, 5.0),
    "request_timeout": (positive_seconds, 5.0),
    "ca_cert": (_path, None),
    "cert_file": (_path, None),
    "key_file": (_path, None),
    "require_durable": (_flag, False),
    # Redis: seconds added to the server clock for the first fence of a lock whose
    # counter is missing, covering a new primary whose clock lags (docs/locks.md).
    "fence_skew_margin": (_margin, 0.0),
    # Redis Sentinel: the sentinels' own credentials, when they differ from the data
    # nodes' (the URL's user information is the data nodes').
    "sentinel_username": (_text, None),
    "sentinel_password": (_text, None),
    # Redis with replicas: each forced decision-log write waits (WAIT) until this many
    # replicas acknowledged it, for at most replica_timeout; fewer is a BackendUnavailable.
    "min_replicas": (_replica_count, 0),
    "replica_timeout": (positive_seconds, 1.0),
}


@dataclass(frozen=True)
class Settings:
    """A validated connection configuration.

    ``hosts`` is empty for ``memory://``; for Sentinel they are the sentinels, for a
    Cluster its startup nodes. ``database`` is the Redis db number or the name of the
    in-process memory store. ``topology`` is ``single``, ``sentinel`` (``service`` names
    the monitored primary) or ``cluster``.
    """

    kind: str
    tls: bool = False
    hosts: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    database: str = "0"
    options: Mapping[str, Any] = field(default_factory=dict)
    topology: str = "single"
    service: str | None = None

    @property
    def namespace(self) -> str:
        return str(self.options["namespace"])

    @property
    def connect_timeout(self) -> float:
        return float(self.options["connect_timeout"])

    @property
    def request_timeout(self) -> float:
        return float(self.options["request_timeout"])

    @property
    def url(self) -> str:
        """The URL without the password, safe to print."""
        scheme = registry.scheme_name(self.kind, self.tls, self.topology)
        auth = f"{self.username or ''}:***@" if self.password else ""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.hosts)
        return f"{scheme}://{auth}{hosts}{registry.driver(self.kind).format_path(self)}"


def settings_from(config: str | Mapping[str, Any] | None = None, **options: Any) -> Settings:
    """Build :class:`Settings` from a URL, a mapping with a ``"url"`` key, or the environment.

    Keyword options override options given in the URL query or the mapping.
    """
    if config is None:
        url = _environment_url()
        merged: dict[str, Any] = {}
    elif isinstance(config, str):
        url, merged = config, {}
    elif isinstance(config, Mapping):
        merged = dict(config)
        url = merged.pop("url", None)
        if url is None:
            url = _environment_url()
        if not isinstance(url, str):
            raise ConfigError(f"url must be a string, got {url!r}")
    else:
        raise ConfigError(f"config must be a URL string or a mapping, got {config!r}")
    merged.update(options)
    return parse_url(url, merged)


def _environment_url() -> str:
    url = os.environ.get(ENV_URL)
    if url is None:
        return DEFAULT_URL
    if not url.strip():
        # Most likely a deployment variable that did not expand: connecting to an
        # in-process store instead would look like working coordination, and is not.
        raise ConfigError(
            f"{ENV_URL} is set but empty; give a backend URL, or unset it for {DEFAULT_URL}"
        )
    return url


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``.

    The user information is what precedes the last ``@`` (after ``scheme://``, if any);
    its part after the first ``:`` is the password.
    """
    scheme, rest = _split_scheme(url)
    userinfo, at, after = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        url = f"{scheme}{'://' if scheme else ''}{user}{':***' if colon else ''}@{after}"
    return url


def _split_scheme(url: str) -> tuple[str, str]:
    """``(scheme, rest)`` around the first ``://``; ``("", url)`` when what precedes it
    is no scheme (then the ``://`` may be inside a password)."""
    scheme, sep, rest = url.partition("://")
    return (scheme, rest) if sep and _SCHEME_RE.fullmatch(scheme) else ("", url)


def parse_url(url: str, options: Mapping[str, Any] | None = None) -> Settings:
    """Parse and validate a dcoord URL plus options into :class:`Settings`.

    What is common to every URL is read here; the scheme's driver (see
    :mod:`dcoord.backends.registry`) gives its default port and reads the path.
    """
    shown = quoted(redact_url(url))
    scheme_text, rest = _split_scheme(url)
    if not scheme_text:
        raise ConfigError(f"not a dcoord URL (expected scheme://...): {shown}")
    driver, scheme = registry.lookup(scheme_text.lower(), shown)
    # The user information first, by the last '@': a password may hold '/', '?' or '#'.
    userinfo, at, rest = ("", "", rest) if driver.embedded else rest.rpartition("@")
    rest, _, query = rest.partition("?")
    merged = dict(parse_qsl(query, keep_blank_values=True))
    merged.update(options or {})
    validated = _validate_options(merged)

    if driver.embedded:
        location = driver.parse_path(registry.UrlParts(scheme, rest, (), shown))
        return Settings(
            driver.kind,
            scheme.tls,
            database=location.database,
            options=validated,
            topology=scheme.topology,
            service=location.service,
        )

    given = [name for name in TLS_OPTIONS if validated[name] is not None]
    if given and not scheme.tls:
        secure = [s.name for s in driver.schemes if s.tls and s.topology == scheme.topology]
        hint = f"; use {secure[0]}://" if secure else ""
        raise ConfigError(
            f"{', '.join(given)} given with {scheme.name}://, which does not use TLS: the "
            f"connection and its password would go in plaintext{hint}"
        )
    hostlist, _, path = rest.partition("/")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    default_port = scheme.default_port or driver.default_port
    assert default_port is not None  # only an embedded driver has none: it returned above
    hosts = tuple(_parse_host(h, default_port, shown) for h in hostlist.split(","))
    if len(hosts) > 1 and not scheme.multi_host:
        several = [s.name + "://" for s in driver.schemes if s.multi_host and s.tls == scheme.tls]
        raise ConfigError(
            f"a {scheme.name}:// URL names exactly one host, got {quoted(hostlist)}"
            + (f"; for several use {' or '.join(several)}" if several else "")
        )
    location = driver.parse_path(registry.UrlParts(scheme, path, hosts, shown))
    if (validated["cert_file"] is None) != (validated["key_file"] is None):
        raise ConfigError("cert_file and key_file must be given together")
    sentinel_auth = (validated["sentinel_username"], validated["sentinel_password"])
    if scheme.topology != "sentinel" and sentinel_auth != (None, None):
        raise ConfigError(f"sentinel_username/sentinel_password given with {scheme.name}://")
    return Settings(
        driver.kind,
        scheme.tls,
        hosts,
        username,
        password,
        location.database,
        validated,
        scheme.topology,
        location.service,
    )


def _parse_host(text: str, default_port: int, shown: str) -> tuple[str, int]:
    match = _HOST_RE.fullmatch(text)
    if not match:
        raise ConfigError(f"bad host {quoted(text)} in {shown}")
    host, port_text = match.group(1), match.group(2)
    if host.startswith("["):
        host = host[1:-1]
    else:
        name = host.removesuffix(".")  # a fully qualified name may end with '.'
        labels = name.split(".")
        if len(name) > MAX_HOST_NAME or not all(0 < len(x) <= MAX_HOST_LABEL for x in labels):
            raise ConfigError(
                f"bad host name {quoted(host)} in {shown}: at most {MAX_HOST_NAME} "
                f"characters, in dot-separated labels of 1-{MAX_HOST_LABEL}"
            )
    if port_text is None:
        return host, default_port
    if not _PORT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"bad port {quoted(port_text)} in {shown} (must be 1-65535)")
    return host, int(port_text)


def _validate_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown option {quoted(unknown[0])}; known: {', '.join(sorted(OPTIONS))}"
        )
    validated = {}
    for name, (validate, default) in OPTIONS.items():
        validated[name] = validate(name, options[name]) if name in options else default
    return validated
