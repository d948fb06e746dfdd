"""Structured fields on dcoord's log records, for JSON log handlers to index.

dcoord passes them with ``extra=``, so they are attributes of each
:class:`logging.LogRecord` (``record.dcoord_lock``) and keys of a JSON formatter's
output. Records about a client's work carry :data:`BACKEND` and :data:`NAMESPACE`, plus
whichever of the others apply. The per-backend loggers ``dcoord.redis`` and
``dcoord.etcd`` stamp :data:`BACKEND` on every record themselves. No field ever holds a
password: URLs appear only in their printable form (``user:***@host``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .aio.lock import AsyncLock
    from .aio.twopc import AsyncCoordinator
    from .config import Settings
    from .lock import Lock
    from .membership import Group
    from .twopc import Coordinator

BACKEND = "dcoord_backend"
NAMESPACE = "dcoord_namespace"
LOCK = "dcoord_lock"
FENCE = "dcoord_fence"
GROUP = "dcoord_group"
MEMBER = "dcoord_member"
TXID = "dcoord_txid"
PARTICIPANT = "dcoord_participant"

Fields = dict[str, object]


def client_fields(settings: Settings) -> Fields:
    """The backend kind and namespace of a client's settings."""
    return {BACKEND: settings.kind, NAMESPACE: settings.namespace}


def participant_fields(settings: Settings, participant: str, txid: str) -> Fields:
    """A participant's client, name and the transaction concerned."""
    return {**client_fields(settings), TXID: txid, PARTICIPANT: participant}


def lock_fields(lock: Lock | AsyncLock) -> Fields:
    """A lock's client, name and latest fence (None before its first grant)."""
    return {**client_fields(lock._client.settings), LOCK: lock.name, FENCE: lock._last_fence}


def member_fields(group: Group, member_id: str | None = None) -> Fields:
    """A group's client and name, and the member concerned if any."""
    return {**client_fields(group.client.settings), GROUP: group.name, MEMBER: member_id}


def tx_fields(
    coordinator: Coordinator | AsyncCoordinator,
    txid: str | None = None,
    participant: str | None = None,
) -> Fields:
    """A coordinator's client, and the transaction and participant concerned if any."""
    return {**client_fields(coordinator.client.settings), TXID: txid, PARTICIPANT: participant}


class _BackendKind(logging.Filter):
    """Stamps the backend kind on records of a per-backend logger that lack it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, BACKEND):
            setattr(record, BACKEND, self.kind)
        return True


for _kind in ("redis", "etcd"):
    logging.getLogger(f"dcoord.{_kind}").addFilter(_BackendKind(_kind))
