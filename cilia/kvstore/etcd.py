"""The etcd v3 backend: native revisions and leases, transactions for compare-and-set, resumable watches.

Keys live under the root `cilia/` (`identities/labels/ab12` is etcd key `cilia/identities/labels/ab12`)
so cilia can share an etcd with others. A revision is etcd's `mod_revision`. `create`, `update` and a
delete with a revision are transactions comparing `create_revision == 0` or `mod_revision`; their
failure branch reads the key, so the error names the revision found. Leases are etcd leases: a
keepalive is one round on a LeaseKeepAlive stream, and etcd deletes the keys of an expired lease.

A watch lists the prefix at revision R, then watches from R+1 with progress notifications. When the
stream breaks (etcd restarted, connection lost) it watches again from the last revision it saw + 1,
so nothing is lost while etcd keeps that history; if it was compacted meanwhile, the watch lists
again and reports the difference (`cilia.kvstore.resync`).

The gRPC types come through `aetcd.rpc` (aetcd's generated etcd v3 protobufs); aetcd's own client is
not used, because its shared watch stream cannot resume from a revision after an error.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
from collections.abc import AsyncGenerator, Iterable
from typing import Any

from aetcd import rpc

from cilia.kvstore.address import Address
from cilia.kvstore.base import LIST_DONE, Entry, EventKind, Lease, Watch, WatchEvent, check_revision
from cilia.kvstore.errors import (
    KeyExistsError,
    KVError,
    KVUnavailableError,
    LeaseExpiredError,
    RevisionMismatchError,
)
from cilia.kvstore.keys import full_prefix, split_key
from cilia.kvstore.resync import resync

log = logging.getLogger(__name__)

ROOT = "cilia/"
BACKOFF = (0.1, 2.0)  # first and longest pause of a watch between failed attempts
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),  # find a dead connection within ~15 s (etcd allows >= 5 s)
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 100),  # a restarted etcd is used again within 2 s
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def range_end(prefix: bytes) -> bytes:
    """The end of etcd's key range of all keys starting with `prefix`."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1]) if trimmed else b"\0"


class _Resume(Exception):
    """The watch stream ended; watch again from the last revision seen."""


class _Compacted(Exception):
    """etcd no longer has the history the watch needs; list again."""


class EtcdKVStore:
    """The kvstore on etcd v3 (see the module docstring)."""

    def __init__(self, channel: Any, address: Address, *, timeout: float = 5.0, root: str = ROOT) -> None:
        self._channel = channel
        self._address = address
        self._timeout = timeout
        self._root = root
        self._kv = rpc.KVStub(channel)
        self._lease = rpc.LeaseStub(channel)
        self._watch = rpc.WatchStub(channel)
        self._watches: set[Watch] = set()
        self._closed = False

    @classmethod
    async def connect(cls, address: Address, *, timeout: float = 5.0) -> EtcdKVStore:
        """Open a channel to etcd at `address` and check that etcd answers."""
        channel = rpc.insecure_channel(f"{address.host}:{address.port}", options=CHANNEL_OPTIONS)
        store = cls(channel, address, timeout=timeout)
        try:
            await store._call(
                "read", store._kv.Range, rpc.RangeRequest(key=store._root.encode(), count_only=True)
            )
        except KVError:
            await store.close()
            raise
        return store

    def _error(self, what: str, err: Any, lease: Lease | None = None) -> KVError:
        code, details = err.code(), err.details()
        if lease is not None and code == rpc.StatusCode.NOT_FOUND and "lease not found" in (details or ""):
            return LeaseExpiredError(lease.id)
        if code in (rpc.StatusCode.UNAVAILABLE, rpc.StatusCode.DEADLINE_EXCEEDED, rpc.StatusCode.CANCELLED):
            return KVUnavailableError("etcd", self._address.shown, f"cannot {what}: {code.name}")
        return KVError(f"etcd at {self._address.shown} refused to {what}: {details} ({code.name})")

    async def _call(self, what: str, method: Any, request: Any, lease: Lease | None = None) -> Any:
        """One unary call that waits up to the timeout for etcd to be reachable."""
        if self._closed:
            raise KVUnavailableError(
                "etcd", self._address.shown, f"cannot {what}: the kvstore was closed", "connect again"
            )
        try:
            return await method(request, timeout=self._timeout, wait_for_ready=True)
        except rpc.AioRpcError as err:
            raise self._error(what, err, lease) from err

    def _key(self, key: str) -> bytes:
        split_key(key)
        return (self._root + key).encode()

    def _entry(self, kv: Any) -> Entry:
        return Entry(kv.key.decode()[len(self._root) :], kv.value, kv.mod_revision)

    async def _txn(
        self, what: str, key: bytes, compare: Any, success: Any, lease: Lease | None = None
    ) -> Any:
        """A transaction whose failure branch reads `key`."""
        request = rpc.TxnRequest(
            compare=[compare],
            success=[success],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
        )
        return await self._call(what, self._kv.Txn, request, lease)

    @staticmethod
    def _found(response: Any) -> int | None:
        """The revision the failure branch of `_txn` found, or None if the key was absent."""
        kvs = response.responses[0].response_range.kvs
        return int(kvs[0].mod_revision) if kvs else None

    # -- the contract -------------------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        """The key's entry, or None."""
        response = await self._call(f"read {key!r}", self._kv.Range, rpc.RangeRequest(key=self._key(key)))
        return self._entry(response.kvs[0]) if response.kvs else None

    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        """Write the key unconditionally; returns its new revision."""
        request = rpc.PutRequest(key=self._key(key), value=value, lease=lease.id if lease else 0)
        response = await self._call(f"write {key!r}", self._kv.Put, request, lease)
        return int(response.header.revision)

    async def create(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        """Write the key if it does not exist, else KeyExistsError."""
        k = self._key(key)
        absent = rpc.Compare(key=k, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=value, lease=lease.id if lease else 0))
        response = await self._txn(f"create {key!r}", k, absent, put, lease)
        if not response.succeeded:
            raise KeyExistsError(key, self._found(response) or 0)
        return int(response.header.revision)

    async def update(self, key: str, value: bytes, revision: int, lease: Lease | None = None) -> int:
        """Write the key if it is still at `revision`, else RevisionMismatchError."""
        check_revision(revision)
        k = self._key(key)
        same = rpc.Compare(key=k, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=revision)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=value, lease=lease.id if lease else 0))
        response = await self._txn(f"update {key!r}", k, same, put, lease)
        if not response.succeeded:
            raise RevisionMismatchError(key, revision, self._found(response))
        return int(response.header.revision)

    async def delete(self, key: str, revision: int | None = None) -> bool:
        """Delete the key (only if still at `revision`, when given); False if it did not exist."""
        k = self._key(key)
        if revision is None:
            response = await self._call(
                f"delete {key!r}", self._kv.DeleteRange, rpc.DeleteRangeRequest(key=k)
            )
            return int(response.deleted) > 0
        check_revision(revision)
        same = rpc.Compare(key=k, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=revision)
        remove = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k))
        response = await self._txn(f"delete {key!r}", k, same, remove)
        if not response.succeeded:
            raise RevisionMismatchError(key, revision, self._found(response))
        return True

    async def _range(self, prefix: str) -> tuple[dict[str, Entry], int]:
        """The entries under `prefix` and the store revision they were read at."""
        start = (self._root + full_prefix(prefix)).encode()
        request = rpc.RangeRequest(key=start, range_end=range_end(start))
        response = await self._call(f"list {prefix!r}", self._kv.Range, request)
        entries = {entry.key: entry for entry in map(self._entry, response.kvs)}
        return entries, int(response.header.revision)

    async def list(self, prefix: str) -> builtins.list[Entry]:
        """Every entry under `prefix`, sorted by key."""
        entries, _ = await self._range(prefix)
        return sorted(entries.values(), key=lambda e: e.key)

    # -- leases -------------------------------------------------------------------------------------

    async def grant(self, ttl_seconds: int) -> Lease:
        """A new etcd lease (etcd may raise a very short TTL to its minimum)."""
        if ttl_seconds < 1:
            raise KVError(f"lease TTL must be at least 1 second, not {ttl_seconds}")
        response = await self._call(
            "grant a lease", self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl_seconds)
        )
        if response.error:
            raise KVError(
                f"etcd at {self._address.shown} refused a lease of {ttl_seconds} s: {response.error}"
            )
        return Lease(int(response.ID), int(response.TTL))

    async def keepalive(self, lease: Lease) -> None:
        """Restart the lease's TTL; LeaseExpiredError if etcd no longer has it."""
        call = self._lease.LeaseKeepAlive(timeout=self._timeout, wait_for_ready=True)
        try:
            await call.write(rpc.LeaseKeepAliveRequest(ID=lease.id))
            async for response in call:
                if response.TTL <= 0:
                    raise LeaseExpiredError(lease.id)
                return
        except rpc.AioRpcError as err:
            raise self._error("keep a lease alive", err, lease) from err
        finally:
            call.cancel()
        raise KVUnavailableError(
            "etcd", self._address.shown, "the lease keepalive stream ended without an answer"
        )

    async def revoke(self, lease: Lease) -> None:
        """Revoke the lease; etcd deletes its keys. An expired lease is not an error."""
        with contextlib.suppress(LeaseExpiredError):
            await self._call(
                "revoke a lease", self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease.id), lease
            )

    # -- watch --------------------------------------------------------------------------------------

    def watch(self, prefix: str) -> Watch:
        """Current entries under `prefix`, LIST_DONE, then changes; resumes after errors (see module docstring)."""
        full_prefix(prefix)  # a malformed prefix fails here, not in the watch's task
        watch = Watch(lambda: self._watch_events(prefix), self._watches.discard)
        self._watches.add(watch)
        return watch

    async def _watch_events(self, prefix: str) -> AsyncGenerator[WatchEvent, None]:
        start = (self._root + full_prefix(prefix)).encode()
        known: dict[str, int] | None = None  # key -> revision as reported; None until the first listing
        revision = 0  # every change up to this revision has been reported
        relist = True
        pause = BACKOFF[0]
        while not self._closed:
            reason, delay = "", 0.0
            try:
                if relist:
                    listing, revision = await self._range(prefix)
                    if known is None:
                        for entry in sorted(listing.values(), key=lambda e: e.revision):
                            yield WatchEvent(EventKind.PUT, entry.key, entry.value, entry.revision)
                        yield LIST_DONE
                    else:
                        for event in resync(known, listing, revision):
                            yield event
                    known = {key: entry.revision for key, entry in listing.items()}
                    relist = False
                assert known is not None
                async with contextlib.aclosing(self._follow(start, revision + 1, known)) as changes:
                    async for change, seen in changes:
                        revision = seen
                        pause = BACKOFF[0]
                        if change is not None:
                            yield change
            except _Compacted as err:
                reason, relist = str(err), True
            except (_Resume, KVUnavailableError) as err:
                reason, delay, pause = str(err), pause, min(pause * 2, BACKOFF[1])
            except rpc.AioRpcError as err:
                reason, delay, pause = (
                    str(self._error(f"watch {prefix!r}", err)),
                    pause,
                    min(pause * 2, BACKOFF[1]),
                )
            if self._closed:
                return
            log.info(
                "kvstore watch resumes backend=etcd prefix=%s revision=%d reason=%r", prefix, revision, reason
            )
            await asyncio.sleep(delay)

    async def _follow(
        self, start: bytes, from_revision: int, known: dict[str, int]
    ) -> AsyncGenerator[tuple[WatchEvent | None, int], None]:
        """The events of one watch stream, each with the revision through which all changes are known."""
        call = self._watch.Watch(wait_for_ready=True)
        try:
            create = rpc.WatchCreateRequest(
                key=start, range_end=range_end(start), start_revision=from_revision, progress_notify=True
            )
            await call.write(rpc.WatchRequest(create_request=create))
            seen = from_revision - 1
            async for response in call:
                if response.compact_revision:
                    raise _Compacted(f"history before revision {response.compact_revision} was compacted")
                if response.canceled:
                    raise _Resume(f"etcd canceled the watch: {response.cancel_reason}")
                if response.created:
                    continue
                if not response.events:  # a progress notification: nothing new up to its revision
                    seen = max(seen, int(response.header.revision))
                    yield None, seen
                for ev in response.events:
                    entry = self._entry(ev.kv)
                    seen = max(seen, entry.revision)
                    if ev.type == rpc.Event.DELETE:
                        known.pop(entry.key, None)
                        yield WatchEvent(EventKind.DELETE, entry.key, b"", entry.revision), seen
                    else:
                        known[entry.key] = entry.revision
                        yield WatchEvent(EventKind.PUT, entry.key, entry.value, entry.revision), seen
            raise _Resume("the watch stream ended")
        finally:
            call.cancel()

    async def prepare(self, buckets: Iterable[str]) -> None:
        """etcd has no buckets to make."""

    async def close(self) -> None:
        """End every watch and close the channel."""
        self._closed = True
        for watch in builtins.list(self._watches):
            await watch.aclose()
        await self._channel.close()
