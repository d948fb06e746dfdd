"""Deliberately broken variants of our own code: the negative controls of the checkers.

A mutant is applied inside a worker to its own client (or module) only; the checkers
must then report violations within a few seeds. If one does not, the checker is wrong.
"""

from __future__ import annotations

import dcoord

MUTANTS = ("del-release", "commit-before-log")


def apply(name: str | None, client: dcoord.Client) -> None:
    """Break ``client`` the way mutant ``name`` says (None: leave it correct)."""
    if name is None:
        return
    if name not in MUTANTS:
        raise ValueError(f"unknown mutant {name!r}; choose from {', '.join(MUTANTS)}")
    raise NotImplementedError(name)
