"""Where dcoord's locks live in etcd, for tools that share them (``etcdctl lock``, Go).

dcoord's etcd locks follow etcd's own mutex recipe (``client/v3/concurrency``): the holder
is the key with the lowest create revision under the lock's prefix. A Go
``concurrency.NewMutex(session, P)`` or ``etcdctl lock P`` given the prefix below queues
in the same line as dcoord. This module needs no etcd client library, so that
``dcoord lock --etcd-key`` works on a machine without the ``etcd`` extra.

The etcd backend builds its keys from these functions, and
tests/conformance/test_etcd_interop.py fails if what they print stops being what
``etcdctl lock`` shares.
"""

from __future__ import annotations

from .base import key_segment


def namespace_prefix(namespace: str) -> str:
    """The etcd prefix under which every key of ``namespace`` lives: ``/dcoord/NS/``."""
    return f"/dcoord/{namespace}/"


def etcd_lock_prefix(namespace: str, name: str) -> str:
    """The etcd mutex prefix of dcoord lock ``name`` in ``namespace``.

    ``/dcoord/NAMESPACE/lock/SEGMENT``, SEGMENT being ``name`` with ``%``, ``/``, ``{``
    and ``}`` percent-encoded. There is no trailing slash: Go's ``NewMutex`` and
    ``etcdctl lock`` append one themselves, and given a prefix that already ends in
    ``/`` they would queue under ``.../SEGMENT//`` and not see dcoord's holder.
    """
    return f"{namespace_prefix(namespace)}lock/{key_segment(name)}"
