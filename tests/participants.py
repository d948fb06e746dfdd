"""A two-phase-commit participant for tests that need one but test something else."""

from __future__ import annotations

from typing import Any


class Voter:
    """Votes ``vote`` in every prepare and remembers each outcome by txid."""

    def __init__(self, name: str, vote: bool = True) -> None:
        self.name = name
        self.vote = vote
        self.outcomes: dict[str, str] = {}

    def prepare(self, txid: str, payload: Any) -> bool:
        return self.vote

    def commit(self, txid: str) -> None:
        self.outcomes[txid] = "committed"

    def abort(self, txid: str) -> None:
        self.outcomes[txid] = "aborted"
