"""The Lua scripts shipped beside this package."""

from __future__ import annotations

from importlib import resources


def lua(name: str, *, checked: bool = False) -> str:
    """The text of ``<name>.lua``; ``checked``: after ``check.lua``, which gives it
    ``check(command, key, ...)`` to ask before its first write whether the ACL allows each
    later one (a script is not rolled back when a command in it fails)."""
    package = resources.files(__package__)
    text = package.joinpath(f"{name}.lua").read_text()
    return package.joinpath("check.lua").read_text() + text if checked else text
