"""The fenced-counter worker on dcoord.aio, mixed with sync ones in one run (``--aio``).

The same iteration as :func:`.workloads.counter_worker` (acquire, admit, read both
counters, work, write the unfenced one plainly and the fenced one through the fence,
release), on the same lock, fence and keys, recorded in the same history format, so
the checkers cannot tell the async workers from the sync ones. A pause blocks its event
loop at a failpoint (memory: a thread worker) or stops the process (SIGSTOP): either
way its lock's renewal task stops too, as a paused process's would.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import dcoord.aio
from dcoord.backends.etcd_names import namespace_prefix
from dcoord.backends.memory.kv import MemoryKV

from .history import FAIL, OK, UNKNOWN, Recorder
from .workloads import FENCED, LOCK, RESOURCE, UNFENCED, Failpoint, Spec, decode, recorder_and_rng


class PlainKeys:
    """Plain get/put of the counters' keys through an async client's own connection
    (the keys the sync workers read with ``client.backend.kv``)."""

    def __init__(self, client: dcoord.aio.AsyncClient) -> None:
        self.backend: Any = client.backend
        self.kind = self.backend.kind
        if self.kind == "memory":
            self.memory = MemoryKV(self.backend.server, self.backend.prefix)

    def _etcd_key(self, key: str) -> bytes:
        return f"{namespace_prefix(self.backend.settings.namespace)}kv/{key}".encode()

    async def get(self, key: str) -> bytes | None:
        if self.kind == "memory":
            return self.memory.get(key)
        backend = self.backend
        if self.kind == "redis":
            value: bytes | None = await backend.call(
                lambda: backend.redis.get(f"{backend.prefix}kv:{key}"), what=f"get {key!r}"
            )
            return value
        from pyetcd import etcdrpc

        request = etcdrpc.RangeRequest(key=self._etcd_key(key))
        reply = await backend.call(
            lambda: backend.kv.Range(request, timeout=backend.timeout, metadata=backend.metadata),
            what=f"get {key!r}",
        )
        return bytes(reply.kvs[0].value) if reply.kvs else None

    async def put(self, key: str, value: bytes) -> None:
        if self.kind == "memory":
            self.memory.put(key, value)
            return
        backend = self.backend
        if self.kind == "redis":
            await backend.call(
                lambda: backend.redis.set(f"{backend.prefix}kv:{key}", value), what=f"put {key!r}"
            )
            return
        from pyetcd import etcdrpc

        request = etcdrpc.PutRequest(key=self._etcd_key(key), value=value)
        await backend.call(
            lambda: backend.kv.Put(request, timeout=backend.timeout, metadata=backend.metadata),
            what=f"put {key!r}",
        )


def admit_all(client: dcoord.aio.AsyncClient, keys: PlainKeys) -> None:
    """The ``admit-all`` mutant (mutants.py) on an async client: every token admitted,
    every fenced write written."""
    locks: Any = client.backend.locks

    async def admit(resource: str, token: int) -> bool:
        return True

    async def write(resource: str, token: int, key: str, value: bytes) -> bool:
        await keys.put(key, value)
        return True

    locks.admit, locks.write = admit, write


async def aio_counter_worker(spec: Spec, stop: threading.Event, failpoint: Failpoint) -> None:
    """The fenced-counter loop on dcoord.aio, until ``stop`` is set."""
    rec, rng = recorder_and_rng(spec)
    client = await dcoord.aio.connect(
        spec.url, namespace=spec.namespace, request_timeout=spec.request_timeout
    )
    keys = PlainKeys(client)
    if spec.mutant == "admit-all":
        admit_all(client, keys)
    guard = client.fence(RESOURCE)
    try:
        while not stop.is_set():
            failpoint("acquire")
            lock = client.lock(LOCK, ttl=spec.ttl, fair=bool((spec.extra or {}).get("fair")))
            with rec.invoke("acquire") as op:
                if await lock.acquire(timeout=spec.acquire_timeout):
                    op.ok({"fence": lock.fence})
                else:
                    op.fail()
            if op.result == UNKNOWN:
                await asyncio.sleep(rng.uniform(0.05, 0.2))  # as backoff(), on the loop
            if op.result != OK:
                continue
            fence = lock.fence
            if not await critical_section(spec, rec, rng, keys, guard, fence, failpoint):
                await asyncio.sleep(rng.uniform(0.05, 0.2))
            failpoint("release")
            with rec.invoke("release", {"fence": fence}):
                await lock.release()
    finally:
        rec.close()
        await client.close()


async def critical_section(
    spec: Spec,
    rec: Recorder,
    rng: Any,
    keys: PlainKeys,
    guard: Any,
    fence: int,
    failpoint: Failpoint,
) -> bool:
    """:func:`.workloads._critical_section` on dcoord.aio."""
    failpoint("admit")
    with rec.invoke("admit", {"fence": fence}) as op:
        if not await guard.admit(fence):
            op.fail()
    if op.result != OK:
        return op.result == FAIL
    with rec.invoke("read", {"key": FENCED}) as op:
        current = decode(await keys.get(FENCED))
        op.ok(current)
    if op.result != OK:
        return False
    with rec.invoke("uread", {"key": UNFENCED}) as op:
        unfenced = decode(await keys.get(UNFENCED))
        op.ok(unfenced)
    if op.result != OK:
        return False
    failpoint("work")
    await asyncio.sleep(rng.uniform(*spec.work))
    failpoint("uwrite")
    new_u = {"count": (unfenced or {}).get("count", 0) + 1, "fence": fence, "by": spec.process}
    with rec.invoke("uwrite", {"fence": fence, "read": unfenced, "value": new_u}):
        await keys.put(UNFENCED, json.dumps(new_u).encode())
    failpoint("write")
    new = {"count": (current or {}).get("count", 0) + 1, "fence": fence, "by": spec.process}
    with rec.invoke("write", {"fence": fence, "read": current, "value": new}) as op:
        if not await guard.write(fence, FENCED, json.dumps(new).encode()):
            op.fail()
    return op.result != UNKNOWN
