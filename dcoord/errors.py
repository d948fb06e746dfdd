"""Every error dcoord raises on purpose derives from :class:`DcoordError`.

Catch ``DcoordError`` to handle all of them; catch a subclass to handle one failure.
"""

from __future__ import annotations

from collections.abc import Mapping


class DcoordError(Exception):
    """Base class of every error dcoord raises on purpose."""


class ConfigError(DcoordError, ValueError):
    """Bad configuration or bad input: the message names the bad value.

    Nothing has been written to the backend when this is raised.
    """


class BackendUnavailable(DcoordError):
    """The backend server could not be reached or did not answer in time.

    Raised after bounded retries; the underlying error is chained as ``__cause__``.
    An operation that ended this way has an *unknown* outcome: it may have taken effect.
    """


class ClientClosed(DcoordError):
    """The client was closed: nothing more can be done with it or what it made."""


class BackendError(DcoordError):
    """The server answered with an error that retrying cannot fix (the reply is quoted).

    Transient replies (a server loading, busy, read-only during a failover, not the
    leader) are retried and end as :class:`BackendUnavailable` instead.
    """


class PermissionDenied(BackendError):
    """The server refused this user the command or key (Redis ACL, etcd RBAC).

    Nothing was written. The message names the operation, never the password.
    """


class LockError(DcoordError):
    """Base class of lock failures."""


class LockTimeout(LockError):
    """The lock was not acquired within the timeout."""


class LockNotOwned(LockError):
    """Release or extend of a lock this handle does not hold (expired, lost, never held)."""


class LockLost(LockError):
    """A held lock was lost: its TTL passed without renewal, or renewal failed."""


class MembershipError(DcoordError):
    """Base class of membership failures at run time."""


class AlreadyJoined(MembershipError):
    """A member id that is already joined and alive was joined again."""


class NoMembers(MembershipError, LookupError):
    """A lookup on a live ring whose group has no live members."""


class NotEnoughMembers(NoMembers):
    """``nodes_for(key, n)`` on a live ring whose group has fewer than ``n`` live members."""


class TransactionError(DcoordError):
    """Base class of two-phase-commit failures."""


class TransactionAborted(TransactionError):
    """The transaction was aborted; ``votes`` maps participant name to its vote.

    A vote is ``True`` (yes), ``False`` (no) or a string describing why no vote came
    (an exception or a timeout).
    """

    def __init__(self, txid: str, votes: Mapping[str, bool | str], reason: str = "") -> None:
        self.txid = txid
        self.votes = dict(votes)
        self.reason = reason
        detail = f": {reason}" if reason else ""
        super().__init__(f"transaction {txid!r} aborted{detail} (votes: {self.votes})")


class TransactionStateError(TransactionError):
    """An operation that the transaction's state does not allow: enlisting in a
    transaction that is already committing or finished, or logging a txid twice."""


class InvalidTransition(TransactionError):
    """A transaction log record was asked to move to a state its state does not allow."""

    def __init__(self, txid: str, current: str, requested: str) -> None:
        self.txid = txid
        self.current = current
        self.requested = requested
        super().__init__(f"transaction {txid!r}: cannot go from {current!r} to {requested!r}")


class DurabilityWarning(UserWarning):
    """The backend would not keep the transaction decision log through a server crash."""


class LogCorrupted(TransactionError):
    """A transaction log record that does not parse; ``txid`` names it."""

    def __init__(self, txid: str, detail: str) -> None:
        self.txid = txid
        super().__init__(f"transaction log record {txid!r} is corrupted: {detail}")
