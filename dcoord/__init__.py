"""dcoord: distributed coordination for Python.

Fenced locks, consistent-hash membership and crash-safe two-phase commit, with one API
over an embedded backend, Redis and etcd::

    import dcoord

    with dcoord.connect("redis://127.0.0.1:6379/0") as client:
        print(client.ping())
"""

from ._version import __version__
from .backends.base import ServerInfo
from .client import Client, connect
from .errors import (
    AlreadyJoined,
    BackendError,
    BackendUnavailable,
    ClientClosed,
    ConfigError,
    DcoordError,
    DurabilityWarning,
    InvalidTransition,
    LockError,
    LockLost,
    LockNotOwned,
    LockTimeout,
    LogCorrupted,
    MembershipError,
    NoMembers,
    NotEnoughMembers,
    PermissionDenied,
    TransactionAborted,
    TransactionError,
    TransactionStateError,
)
from .fence import Fence
from .lock import Lock
from .membership import Group, GroupView, JoinedMember, LiveRing, Member, Watch
from .participants import KVParticipant
from .ring import HashRing
from .rwlock import ReadLock, ReadWriteLock, WriteLock
from .semaphore import Semaphore
from .twopc import Coordinator, Participant, RecoveryReport, Transaction, TxPage
from .txlog import TxRecord, TxState

__all__ = [
    "AlreadyJoined",
    "BackendError",
    "BackendUnavailable",
    "Client",
    "ClientClosed",
    "ConfigError",
    "Coordinator",
    "DcoordError",
    "DurabilityWarning",
    "Fence",
    "Group",
    "GroupView",
    "HashRing",
    "InvalidTransition",
    "JoinedMember",
    "KVParticipant",
    "LiveRing",
    "Lock",
    "LockError",
    "LockLost",
    "LockNotOwned",
    "LockTimeout",
    "LogCorrupted",
    "Member",
    "MembershipError",
    "NoMembers",
    "NotEnoughMembers",
    "Participant",
    "PermissionDenied",
    "ReadLock",
    "ReadWriteLock",
    "RecoveryReport",
    "Semaphore",
    "ServerInfo",
    "Transaction",
    "TransactionAborted",
    "TransactionError",
    "TransactionStateError",
    "TxPage",
    "TxRecord",
    "TxState",
    "Watch",
    "WriteLock",
    "__version__",
    "connect",
]
