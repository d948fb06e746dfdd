"""LeaseHolders (etcd): one lost-callback per lease, every holder told once, at once."""

from __future__ import annotations

import time

import pytest

from dcoord.backends.etcd.leases import Lease, LeaseHolders


class Holder:
    def __init__(self, told: list[str], name: str, *, fails: bool = False) -> None:
        self.told, self.name, self.fails = told, name, fails

    def lost(self) -> None:
        self.told.append(self.name)
        if self.fails:
            raise RuntimeError(f"{self.name} failed")


def test_every_holder_is_told_once_even_when_they_fail(caplog: pytest.LogCaptureFixture) -> None:
    lease, holders, told = Lease(1, 6, time.monotonic()), LeaseHolders(), []
    for name in ("a", "b", "c"):
        # Each fails (the order of a set is not fixed): none may keep the next untold.
        holders.add(Holder(told, name, fails=True), lease)
    gone = Holder(told, "gone")
    holders.add(gone, lease)
    holders.discard(gone, lease)
    assert len(lease._callbacks) == 1  # one per lease, not one per holder
    lease.mark_lost()
    lease.mark_lost()
    assert sorted(told) == ["a", "b", "c"]
    assert "telling a holder of its loss failed" in caplog.text
    # Added after the loss: told at once.
    holders.add(Holder(told, "late"), lease)
    assert told[-1] == "late"
