"""One-shot move of a namespace's Redis keys from the layout before hash tags.

Fences were ``dcoord:<ns>:fence:<R>`` and a KVParticipant's keys
``dcoord:<ns>:kv:kvp/<NAME>/...``; they are now ``fence:{<R>}`` and ``kvp/{<NAME>}/...``
(see :mod:`.slots`). Run :func:`migrate_legacy_keys` once per namespace, with every
process of the old version stopped and before the new version serves traffic:

    python -c "import dcoord; from dcoord.backends.redis.migrate import migrate_legacy_keys; \\
        print(migrate_legacy_keys(dcoord.connect('redis://HOST:6379/0', namespace='NS')))"

Unfinished 2PC log records need no step: every client moves them on first use (see
:mod:`.txlog`). The old layout existed only on one server (a Cluster could not run its
scripts), so there is nothing to move on a Cluster. Moving is idempotent: run it again
after an interruption.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError
from .locks import LuaScript
from .scripts import lua

if TYPE_CHECKING:
    from ...client import Client

MOVE_FENCE = LuaScript(lua("migrate_fence", checked=True))
MOVE_VALUE = LuaScript(lua("migrate_value", checked=True))

_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")
# A participant key of the old layout: kvp/<NAME>/<rest>, NAME without braces.
_OLD_PARTICIPANT_KEY = re.compile(r"kvp/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/(.+)", re.DOTALL)


def migrate_legacy_keys(client: Client) -> dict[str, int]:
    """Move the namespace's fences and KVParticipant keys of the old layout; returns how
    many of each were moved (``{"fences": n, "participant_keys": m}``).

    A fence whose new key exists already keeps the greater token of the two, so a stale
    holder is never admitted by the move. A participant key whose new key exists already
    is left in place and counted under ``"conflicts"``: the new version wrote it, and
    only an operator can tell which is right.
    """
    backend: Any = client.backend
    if backend.kind != "redis":
        raise ConfigError(f"migrate_legacy_keys is for Redis, not {backend.kind}://")
    moved = {"fences": 0, "participant_keys": 0, "conflicts": 0}
    if backend.settings.topology == "cluster":
        return moved
    redis_client = backend.redis
    prefix = backend.prefix

    def scan(head: str) -> list[str]:
        pattern = _GLOB_SPECIALS.sub(r"\\\1", head) + "*"
        return [k.decode() for k in redis_client.scan_iter(match=pattern, count=1000)]

    def move() -> None:
        fences = f"{prefix}fence:"
        for key in scan(fences):
            resource = key[len(fences) :]
            if resource.startswith("{"):
                continue  # the new layout
            MOVE_FENCE(redis_client, [key, f"{fences}{{{resource}}}"], [])
            moved["fences"] += 1
        values = f"{prefix}kv:"
        for key in scan(f"{values}kvp/"):
            match = _OLD_PARTICIPANT_KEY.fullmatch(key[len(values) :])
            if match is None:
                continue  # the new layout (kvp/{NAME}/...), or not a participant's key
            name, rest = match.groups()
            new = f"{values}kvp/{{{name}}}/{rest}"
            if MOVE_VALUE(redis_client, [key, new], []):
                moved["participant_keys"] += 1
            else:
                moved["conflicts"] += 1

    backend.call(move, what="move keys of the old layout")
    backend.txlog.unfinished(limit=1)  # moves the old log's unfinished records too
    return moved
