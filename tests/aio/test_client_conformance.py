"""Connecting, client errors and input checks, run a second time on the async API.

The test functions of tests/conformance/test_connect.py, test_client_errors.py,
test_input_checks.py and test_fuzz_inputs.py are imported, not copied; ``client``,
``connect`` and ``dcoord_connect`` make dcoord.aio clients seen through the adapter
(tests/aio/adapter.py). The fuzz test takes as many inputs as in the sync run (its
twelve runs take about 5 s here).

Left out, and why:

- ``test_namespaces_do_not_see_each_other``, ``test_two_clients_of_one_namespace_share_keys``,
  ``test_scan_treats_glob_characters_literally``: they put and delete plain keys with
  ``client.backend.kv``; the async backend's key store has no put or delete (only the
  get, scan and swap its participants use), so through the adapter that is a sync
  client's store and they would test nothing async.
- ``test_a_join_that_races_close_raises_client_closed_and_leaves_the_member``: it
  replaces the sync group store's ``join`` and closes the client from another thread.
- ``test_any_namespace_connects_or_is_a_config_error``,
  ``test_any_url_parses_or_is_a_config_error``: they check ``settings_from``, which
  ``dcoord.connect`` and ``dcoord.aio.connect`` share.
- test_boundary.py: it fails the sync etcd backend's watch (``add_watch_callback``);
  the async etcd driver watches over grpc.aio, with no such call to fail.
"""

from __future__ import annotations

from typing import Any

import pytest

import dcoord
from tests.aio.adapter import SyncKV, SyncView
from tests.conformance import test_client_errors, test_connect, test_fuzz_inputs, test_input_checks

SYNC_ONLY = {
    "test_namespaces_do_not_see_each_other",
    "test_two_clients_of_one_namespace_share_keys",
    "test_scan_treats_glob_characters_literally",
    "test_a_join_that_races_close_raises_client_closed_and_leaves_the_member",
    "test_any_namespace_connects_or_is_a_config_error",
    "test_any_url_parses_or_is_a_config_error",
}


@pytest.fixture(autouse=True)
def async_participants(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dcoord.KVParticipant(client, name)`` of the input checks, on the async API."""

    def make(client: SyncView, name: str, **options: Any) -> SyncKV:
        return SyncKV(client, name, **options)

    monkeypatch.setattr(dcoord, "KVParticipant", make)


def _imported() -> dict[str, object]:
    tests: dict[str, object] = {}
    for module in (test_connect, test_client_errors, test_input_checks, test_fuzz_inputs):
        for name, value in vars(module).items():
            if name.startswith("test_") and callable(value) and name not in SYNC_ONLY:
                tests[name] = value
    return tests


globals().update(_imported())
