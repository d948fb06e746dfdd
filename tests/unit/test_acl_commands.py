"""The documented Redis ACL rule (``dcoord acl redis``) allows every command dcoord's Lua
scripts call: a command missing there is denied only when a script reaches it (the fair
lock's queue commands were, under confined users)."""

from __future__ import annotations

import re
from pathlib import Path

import dcoord.backends.redis as redis_backend
from dcoord.cli.acl import REDIS_CLUSTER_COMMANDS, REDIS_COMMANDS

CALL = re.compile(r"redis\.(?:p?call)\(\s*'([A-Za-z]+)'")


def script_commands() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in Path(redis_backend.__file__).parent.glob("*.lua"):
        for command in CALL.findall(path.read_text()):
            found.setdefault(command.lower(), set()).add(path.name)
    return found


def test_the_rule_allows_every_command_a_script_calls() -> None:
    allowed = {c.split("|")[0] for c in (*REDIS_COMMANDS, *REDIS_CLUSTER_COMMANDS)}
    used = script_commands()
    assert "rpush" in used  # the scan found the fair lock's queue (not an empty glob)
    missing = {c: sorted(files) for c, files in used.items() if c not in allowed}
    assert missing == {}, f"ACL rule lacks commands the scripts call: {missing}"
