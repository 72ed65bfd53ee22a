"""The NATS JetStream KV backend: one KV bucket per first key segment, leases as refreshed per-key TTLs.

Mapping. Key `identities/labels/ab12` is key `labels.ab12` of KV bucket `identities` (stream
`KV_identities`, subject `$KV.identities.labels.ab12`); path segments are escaped as
`cilia.kvstore.keys` describes. A bucket is created on first use with history 1, direct gets,
per-message TTLs (`allow_msg_ttl`, nats-server >= 2.11) and server-placed markers for keys whose TTL
ran out (`subject_delete_marker_ttl`); a bucket made by someone else gets the last two switched on.
A revision is the stream sequence of the write: revisions of one bucket are ordered, buckets count
separately. Compare-and-set uses `Nats-Expected-Last-Subject-Sequence`. A delete writes a purge
marker that itself expires after `tombstone_ttl` seconds, so deleted keys leave nothing behind.

Leases. JetStream has no leases, so a lease is a time-to-live held by the store that granted it.
`put(key, value, lease)` writes the key with a `Nats-TTL` that ends with the lease (whole seconds,
rounded up) and a `Cilia-Lease` header. `keepalive(lease)` writes each of the lease's keys again with
a fresh TTL, compare-and-set on the sequence so a concurrent writer wins; the copy carries the
original revision in a `Cilia-Revision` header, so `get`, `update` and watchers keep seeing the
revision of the real write and never see a keepalive. If the store or its process goes away nobody
refreshes the keys: the server removes them when the TTL ends and places a marker that watchers
report as DELETE. `revoke` deletes the keys at once. Unlike etcd, a lease is known only to the
connection that granted it (elsewhere: LeaseExpiredError), a key's TTL starts at its own write, and
a keepalive costs one read and one write per key.

Watch. An ephemeral push consumer ("last per subject" on the prefix's subject filter) delivers the
current entries, then every new message. Messages published while the client is disconnected are not
kept for it, so a reconnect (the connection's reconnect count), a gap in the consumer sequence or
missing idle heartbeats make the watcher list again on a new consumer and report the difference from
what it had reported (`cilia.kvstore.resync`): with history 1 old values and tombstones may be gone,
so a listing is the only complete account.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import math
import secrets
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from cilia.kvstore.address import Address
from cilia.kvstore.base import LIST_DONE, Entry, EventKind, Lease, Watch, WatchEvent, check_revision
from cilia.kvstore.errors import (
    KeyExistsError,
    KVError,
    KVUnavailableError,
    LeaseExpiredError,
    RevisionMismatchError,
)
from cilia.kvstore.keys import full_prefix, nats_filter, nats_key, path_of_nats_key, split_key, split_prefix
from cilia.kvstore.resync import resync

log = logging.getLogger(__name__)

KV_OPERATION = "KV-Operation"
MARKER_REASON = "Nats-Marker-Reason"
HDR_TTL = "Nats-TTL"
HDR_ROLLUP = "Nats-Rollup"
HDR_EXPECTED = "Nats-Expected-Last-Subject-Sequence"
HDR_REVISION = "Cilia-Revision"
HDR_LEASE = "Cilia-Lease"
WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream error codes of a failed compare-and-set
STREAM_NAME_IN_USE = 10058
ATTEMPTS = 8  # compare-and-set rounds when only a keepalive copy got in between
LISTING_POLL = 0.5  # seconds without a message before a listing asks the server whether it is complete
BACKOFF = (0.1, 2.0)  # first and longest pause of a watch between failed attempts
JETSTREAM_HINT = (
    "check that nats-server runs with JetStream enabled (-js) and that CILIA_NATS_URL points at it"
)


class _WrongLastSequence(Exception):
    """Another write of the key got in between our read and our compare-and-set."""


class _Stale(Exception):
    """A watch's consumer lost messages or went quiet: list again."""


@dataclass(frozen=True, slots=True)
class _Record:
    """The last message of one key: a value or a tombstone."""

    key: str
    seq: int
    value: bytes
    deleted: bool
    revision: int  # the sequence of the real write; a keepalive copy keeps it
    lease: int | None


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    try:
        return int(headers[name])
    except (KeyError, ValueError):
        return None


def _record(key: str, seq: int, data: bytes | None, headers: Mapping[str, str] | None) -> _Record:
    h = headers or {}
    deleted = h.get(KV_OPERATION) in ("DEL", "PURGE") or MARKER_REASON in h
    return _Record(
        key, seq, data or b"", deleted, _int_header(h, HDR_REVISION) or seq, _int_header(h, HDR_LEASE)
    )


@dataclass
class _LeaseState:
    """What this store knows of a lease it granted: when it ends and which keys were put under it."""

    lease: Lease
    deadline: float
    keys: set[str] = field(default_factory=set)


class _Feed:
    """An ephemeral push consumer: the last message of every key under a filter, then each new one."""

    def __init__(self, store: NatsKVStore, stream: str, name: str, sub: Subscription, pending: int) -> None:
        self._store = store
        self._stream = stream
        self._name = name
        self._sub = sub
        self.pending = pending  # messages of the listing, counted when the consumer was made
        self._delivered = 0
        self.last_seen = asyncio.get_running_loop().time()

    async def next(self, timeout: float) -> Msg | None:
        """The next stream message, or None after an idle heartbeat or `timeout` seconds of nothing."""
        try:
            msg = await self._sub.next_msg(timeout=timeout)
        except nats.errors.TimeoutError:
            return None
        self.last_seen = asyncio.get_running_loop().time()
        headers = msg.headers or {}
        if headers.get("Status") == "100":
            last = _int_header(headers, "Nats-Last-Consumer")
            if last is not None and last != self._delivered:
                raise _Stale(f"heartbeat says {last} messages were sent, {self._delivered} arrived")
            return None
        sequence = msg.metadata.sequence.consumer
        if sequence != self._delivered + 1:
            raise _Stale(f"message {sequence} arrived after message {self._delivered}")
        self._delivered = sequence
        return msg

    async def drained(self) -> bool:
        """Whether the server has nothing more to deliver and everything it delivered has arrived."""
        info = await self._store._jsm.consumer_info(self._stream, self._name)
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        return info.num_pending == 0 and delivered == self._delivered

    async def close(self) -> None:
        """Unsubscribe and delete the consumer; errors are ignored, the server drops it when idle anyway."""
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self._store._jsm.delete_consumer(self._stream, self._name)


class NatsKVStore:
    """The kvstore on NATS JetStream KV buckets (see the module docstring for the mapping and leases)."""

    def __init__(
        self,
        nc: NATS,
        address: Address,
        *,
        timeout: float = 5.0,
        tombstone_ttl: int = 600,
        heartbeat: float = 5.0,
        replicas: int = 1,
    ) -> None:
        self._nc = nc
        self._address = address
        self._timeout = timeout
        self._tombstone_ttl = tombstone_ttl
        self._heartbeat = heartbeat
        self._replicas = replicas
        self._js = nc.jetstream(timeout=timeout)
        self._jsm = nc.jsm(timeout=timeout)
        self._streams: set[str] = set()
        # One lock per bucket: a bucket that is slow to set up (or that this user may not create)
        # never holds up the others.
        self._stream_locks: dict[str, asyncio.Lock] = {}
        self._leases: dict[int, _LeaseState] = {}
        self._watches: set[Watch] = set()
        self._online = asyncio.Event()
        self._closed = False

    @classmethod
    async def connect(
        cls, address: Address, *, user: str | None = None, password: str | None = None, timeout: float = 5.0
    ) -> NatsKVStore:
        """Connect to the NATS server at `address` (reconnecting forever after the first success)."""
        nc = NATS()
        store = cls(nc, address, timeout=timeout)

        errors: list[Exception] = []

        async def on_error(err: Exception) -> None:
            errors.append(err)
            log.debug("nats connection error server=%s error=%r", address.shown, err)

        try:
            await asyncio.wait_for(
                nc.connect(
                    address.url,
                    name="cilia-kvstore",
                    user=user,
                    password=password,
                    connect_timeout=math.ceil(timeout),
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]
                    max_reconnect_attempts=-1,
                    # No buffering while disconnected: a write that timed out must not land later.
                    pending_size=0,
                    error_cb=on_error,
                    disconnected_cb=store._on_disconnect,
                    reconnected_cb=store._on_reconnect,
                ),
                timeout,
            )
        except (TimeoutError, OSError, nats.errors.Error) as err:
            with contextlib.suppress(Exception):
                await nc.close()
            # The server may reset the socket right after refusing the login: any refusal
            # seen on the way counts, not only the last error.
            seen = [*errors, err]
            auth = [
                e for e in seen if isinstance(e, nats.errors.AuthorizationError) or "Authorization" in str(e)
            ]
            refused = bool(auth)
            last = auth[0] if auth else (errors[-1] if errors else err)
            hint = (
                "check the NATS user and password (CILIA_NATS_USER, CILIA_NATS_PASSWORD)" if refused else ""
            )
            raise KVUnavailableError("NATS", address.shown, f"cannot connect: {last!r}", hint) from err
        store._online.set()
        try:
            with store._errors("read JetStream account info", hint=JETSTREAM_HINT):
                await store._jsm.account_info()
        except KVError:
            await store.close()
            raise
        return store

    async def _on_disconnect(self) -> None:
        self._online.clear()
        if not self._closed:
            log.warning("nats disconnected server=%s", self._address.shown)

    async def _on_reconnect(self) -> None:
        self._online.set()
        log.info("nats reconnected server=%s", self._address.shown)

    async def _wait_online(self, what: str) -> None:
        """Wait up to the timeout for the connection to be up, as etcd's gRPC channel does."""
        if self._nc.is_connected:
            return
        if self._nc.is_closed:
            raise KVUnavailableError(
                "NATS", self._address.shown, f"cannot {what}: the kvstore was closed", "connect again"
            )
        try:
            await asyncio.wait_for(self._online.wait(), self._timeout)
        except TimeoutError:
            raise KVUnavailableError("NATS", self._address.shown, f"cannot {what}: not connected") from None

    @contextlib.contextmanager
    def _errors(self, what: str, hint: str = "") -> Iterator[None]:
        """Turn the client's errors into kvstore errors that say what failed and what to check."""
        try:
            yield
        except nats.js.errors.ServiceUnavailableError as err:
            raise KVUnavailableError(
                "NATS", self._address.shown, f"cannot {what}: JetStream unavailable", JETSTREAM_HINT
            ) from err
        except (
            TimeoutError,
            OSError,
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.ConnectionDrainingError,
            nats.errors.StaleConnectionError,
            nats.errors.OutboundBufferLimitError,
            nats.errors.BadSubscriptionError,
            nats.js.errors.NoStreamResponseError,
        ) as err:
            raise KVUnavailableError(
                "NATS", self._address.shown, f"cannot {what}: {type(err).__name__}", hint
            ) from err
        except nats.js.errors.APIError as err:
            raise KVError(
                f"NATS JetStream at {self._address.shown} refused to {what}: {err.description} (code {err.err_code})"
            ) from err

    # -- buckets and messages ---------------------------------------------------------------------

    def _stream_config(self, bucket: str) -> api.StreamConfig:
        return api.StreamConfig(
            name=f"KV_{bucket}",
            subjects=[f"$KV.{bucket}.>"],
            max_msgs_per_subject=1,
            discard=api.DiscardPolicy.NEW,
            storage=api.StorageType.FILE,
            num_replicas=self._replicas,
            allow_direct=True,
            allow_rollup_hdrs=True,
            allow_msg_ttl=True,
            subject_delete_marker_ttl=self._tombstone_ttl,
            deny_delete=True,
            duplicate_window=120,
        )

    async def _stream(self, bucket: str) -> str:
        """The stream of `bucket` once the connection is up; created or adapted on first use."""
        await self._wait_online(f"use bucket {bucket!r}")
        stream = f"KV_{bucket}"
        if stream in self._streams:
            return stream
        async with self._stream_locks.setdefault(stream, asyncio.Lock()):
            if stream not in self._streams:
                with self._errors(f"set up bucket {bucket!r}"):
                    try:
                        info = await self._jsm.stream_info(stream)
                    except nats.js.errors.NotFoundError:
                        try:
                            await self._jsm.add_stream(self._stream_config(bucket))
                        except nats.js.errors.BadRequestError as err:
                            if err.err_code != STREAM_NAME_IN_USE:  # else another client made it meanwhile
                                raise
                        info = await self._jsm.stream_info(stream)
                    config = info.config
                    if not config.allow_msg_ttl or not config.subject_delete_marker_ttl:
                        config.allow_msg_ttl = True
                        config.subject_delete_marker_ttl = (
                            config.subject_delete_marker_ttl or self._tombstone_ttl
                        )
                        config.allow_rollup_hdrs = True
                        await self._jsm.update_stream(config)
                self._streams.add(stream)
        return stream

    async def prepare(self, buckets: Iterable[str]) -> None:
        """Create the streams of these buckets now (a writer's job: readers may not create them)."""
        for bucket in buckets:
            await self._stream(bucket)

    async def _last(self, key: str) -> _Record | None:
        """The last message of `key` (a value or a tombstone), or None if the bucket has none."""
        bucket, path = split_key(key)
        stream = await self._stream(bucket)
        with self._errors(f"read {key!r}"):
            try:
                msg = await self._jsm.get_msg(stream, subject=f"$KV.{bucket}.{nats_key(path)}", direct=True)
            except nats.js.errors.NotFoundError:
                return None
        return _record(key, msg.seq or 0, msg.data, msg.headers)

    async def _publish(self, key: str, value: bytes, headers: dict[str, str]) -> int:
        """Write one message for `key`; _WrongLastSequence if its compare-and-set header failed."""
        bucket, path = split_key(key)
        stream = await self._stream(bucket)
        with self._errors(f"write {key!r}"):
            try:
                ack = await self._js.publish(
                    f"$KV.{bucket}.{nats_key(path)}", value, stream=stream, headers=headers or None
                )
            except nats.js.errors.APIError as err:
                if err.err_code in WRONG_LAST_SEQUENCE:
                    raise _WrongLastSequence from err
                raise
        return ack.seq

    def _contention(self, key: str) -> KVError:
        return KVError(f"key {key!r} kept changing during {ATTEMPTS} compare-and-set attempts: retry later")

    # -- leases -------------------------------------------------------------------------------------

    def _live_lease(self, lease: Lease) -> _LeaseState:
        state = self._leases.get(lease.id)
        if state is None:
            raise LeaseExpiredError(
                lease.id, "NATS leases are known only to the connection that granted them"
            )
        if asyncio.get_running_loop().time() >= state.deadline:
            del self._leases[lease.id]
            raise LeaseExpiredError(lease.id)
        return state

    def _lease_headers(self, lease: Lease | None) -> dict[str, str]:
        if lease is None:
            return {}
        state = self._live_lease(lease)
        ttl = max(1, math.ceil(state.deadline - asyncio.get_running_loop().time()))
        return {HDR_LEASE: str(lease.id), HDR_TTL: str(ttl)}

    def _attach(self, key: str, lease: Lease | None) -> None:
        if lease is not None and (state := self._leases.get(lease.id)) is not None:
            state.keys.add(key)

    async def grant(self, ttl_seconds: int) -> Lease:
        """A new lease held by this store; keys put under it live `ttl_seconds` past the last keepalive."""
        if ttl_seconds < 1:
            raise KVError(f"lease TTL must be at least 1 second, not {ttl_seconds}")
        now = asyncio.get_running_loop().time()
        for lease_id in [i for i, s in self._leases.items() if s.deadline <= now]:
            del self._leases[lease_id]
        lease = Lease(secrets.randbits(63) or 1, ttl_seconds)
        self._leases[lease.id] = _LeaseState(lease, now + ttl_seconds)
        return lease

    async def keepalive(self, lease: Lease) -> None:
        """Give the lease and each of its keys a fresh TTL (the keys keep their revisions)."""
        state = self._live_lease(lease)
        start = asyncio.get_running_loop().time()
        for key in sorted(state.keys):
            if not await self._refresh(key, lease):
                state.keys.discard(key)
        state.deadline = start + lease.ttl

    async def _refresh(self, key: str, lease: Lease) -> bool:
        """Write the key again with a fresh TTL if it is still under `lease`; False if it is not."""
        for _ in range(ATTEMPTS):
            record = await self._last(key)
            if record is None or record.deleted or record.lease != lease.id:
                return False
            headers = {
                HDR_LEASE: str(lease.id),
                HDR_REVISION: str(record.revision),
                HDR_TTL: str(lease.ttl),
                HDR_EXPECTED: str(record.seq),
            }
            try:
                await self._publish(key, record.value, headers)
            except _WrongLastSequence:
                continue
            return True
        raise self._contention(key)

    async def revoke(self, lease: Lease) -> None:
        """End the lease and delete the keys still under it."""
        state = self._leases.pop(lease.id, None)
        if state is None:
            return
        for key in sorted(state.keys):
            await self._delete(key, lease_id=lease.id)

    # -- the contract -------------------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        """The key's entry, or None."""
        record = await self._last(key)
        if record is None or record.deleted:
            return None
        return Entry(key, record.value, record.revision)

    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        """Write the key unconditionally; returns its new revision."""
        revision = await self._publish(key, value, self._lease_headers(lease))
        self._attach(key, lease)
        return revision

    async def create(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        """Write the key if it does not exist, else KeyExistsError."""
        for _ in range(ATTEMPTS):
            record = await self._last(key)
            if record is not None and not record.deleted:
                raise KeyExistsError(key, record.revision)
            expected = record.seq if record is not None else 0
            try:
                revision = await self._publish(
                    key, value, {**self._lease_headers(lease), HDR_EXPECTED: str(expected)}
                )
            except _WrongLastSequence:
                continue
            self._attach(key, lease)
            return revision
        raise self._contention(key)

    async def update(self, key: str, value: bytes, revision: int, lease: Lease | None = None) -> int:
        """Write the key if it is still at `revision`, else RevisionMismatchError."""
        check_revision(revision)
        for _ in range(ATTEMPTS):
            record = await self._last(key)
            if record is None or record.deleted:
                raise RevisionMismatchError(key, revision, None)
            if record.revision != revision:
                raise RevisionMismatchError(key, revision, record.revision)
            try:
                new = await self._publish(
                    key, value, {**self._lease_headers(lease), HDR_EXPECTED: str(record.seq)}
                )
            except _WrongLastSequence:  # a writer (then the next read says so) or a keepalive copy
                continue
            self._attach(key, lease)
            return new
        raise self._contention(key)

    async def delete(self, key: str, revision: int | None = None) -> bool:
        """Delete the key (only if still at `revision`, when given); False if it did not exist."""
        if revision is not None:
            check_revision(revision)
        return await self._delete(key, revision=revision)

    async def _delete(self, key: str, *, revision: int | None = None, lease_id: int | None = None) -> bool:
        """Write a purge marker for `key` if it exists, is at `revision` and under `lease_id` (when given)."""
        for _ in range(ATTEMPTS):
            record = await self._last(key)
            if record is None or record.deleted:
                if revision is not None:
                    raise RevisionMismatchError(key, revision, None)
                return False
            if revision is not None and record.revision != revision:
                raise RevisionMismatchError(key, revision, record.revision)
            if lease_id is not None and record.lease != lease_id:
                return False
            headers = {
                KV_OPERATION: "PURGE",
                HDR_ROLLUP: "sub",
                HDR_TTL: str(self._tombstone_ttl),
                HDR_EXPECTED: str(record.seq),
            }
            try:
                await self._publish(key, b"", headers)
            except _WrongLastSequence:
                continue
            return True
        raise self._contention(key)

    async def list(self, prefix: str) -> builtins.list[Entry]:
        """Every entry under `prefix`, sorted by key."""
        bucket, rest = split_prefix(prefix)
        stream = await self._stream(bucket)
        for _ in range(3):
            feed = await self._open_feed(stream, f"$KV.{bucket}.{nats_filter(rest)}")
            try:
                listing = await self._read_listing(feed, bucket, full_prefix(prefix))
            except _Stale:
                continue
            finally:
                await feed.close()
            return sorted(listing.values(), key=lambda e: e.key)
        raise KVUnavailableError(
            "NATS", self._address.shown, f"listing {prefix!r} kept losing messages", JETSTREAM_HINT
        )

    # -- watch --------------------------------------------------------------------------------------

    async def _open_feed(self, stream: str, subject: str) -> _Feed:
        inbox = self._nc.new_inbox()
        with self._errors(f"start a consumer on {subject}"):
            sub = await self._nc.subscribe(inbox)
            try:
                info = await self._jsm.add_consumer(
                    stream,
                    config=api.ConsumerConfig(
                        deliver_subject=inbox,
                        deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                        ack_policy=api.AckPolicy.NONE,
                        filter_subject=subject,
                        idle_heartbeat=self._heartbeat,
                        inactive_threshold=30,
                        mem_storage=True,
                        num_replicas=1,
                    ),
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
                raise
        assert info.name is not None
        return _Feed(self, stream, info.name, sub, info.num_pending or 0)

    def _parse(self, bucket: str, want: str, msg: Msg) -> _Record | None:
        """The record a consumer message carries, or None if its key is not under `want` (or not ours)."""
        try:
            key = f"{bucket}/{path_of_nats_key(msg.subject[len(bucket) + 5 :])}"
        except ValueError:
            log.debug("kvstore skipped a key it did not write bucket=%s subject=%s", bucket, msg.subject)
            return None
        if not key.startswith(want):
            return None
        return _record(key, msg.metadata.sequence.stream, msg.data, msg.headers)

    async def _read_listing(self, feed: _Feed, bucket: str, want: str) -> dict[str, Entry]:
        """Read the consumer's first messages, the last one of every key, into the current entries."""
        listing: dict[str, Entry] = {}
        loop = asyncio.get_running_loop()
        remaining = feed.pending
        last_data = loop.time()
        while remaining > 0:
            with self._errors(f"list {want!r}"):
                msg = await feed.next(timeout=LISTING_POLL)
                if msg is None and await feed.drained():  # what was left expired before delivery
                    break
            if msg is None:
                if loop.time() - last_data > self._timeout:
                    raise KVUnavailableError(
                        "NATS", self._address.shown, f"listing {want!r} stalled", JETSTREAM_HINT
                    )
                continue
            last_data = loop.time()
            remaining = 0 if msg.metadata.num_pending == 0 else remaining - 1
            record = self._parse(bucket, want, msg)
            if record is None:
                continue
            if record.deleted:
                listing.pop(record.key, None)
            else:
                listing[record.key] = Entry(record.key, record.value, record.revision)
        return listing

    def watch(self, prefix: str) -> Watch:
        """Current entries under `prefix`, LIST_DONE, then changes; survives reconnects (see module docstring)."""
        split_prefix(prefix)  # a malformed prefix fails here, not in the watch's task
        watch = Watch(lambda: self._watch_events(prefix), self._watches.discard)
        self._watches.add(watch)
        return watch

    async def _watch_events(self, prefix: str) -> AsyncGenerator[WatchEvent, None]:
        bucket, rest = split_prefix(prefix)
        want = full_prefix(prefix)
        subject = f"$KV.{bucket}.{nats_filter(rest)}"
        loop = asyncio.get_running_loop()
        known: dict[str, int] | None = None  # key -> revision as reported; None until the first listing
        pause = BACKOFF[0]
        while not self._closed:
            feed: _Feed | None = None
            reason, delay = "", 0.0
            try:
                stream = await self._stream(bucket)
                reconnects = self._nc.stats["reconnects"]
                feed = await self._open_feed(stream, subject)
                listing = await self._read_listing(feed, bucket, want)
                if known is None:
                    for entry in sorted(listing.values(), key=lambda e: e.revision):
                        yield WatchEvent(EventKind.PUT, entry.key, entry.value, entry.revision)
                    yield LIST_DONE
                else:
                    with self._errors(f"read bucket {bucket!r}"):
                        info = await self._jsm.stream_info(stream)
                    for event in resync(known, listing, info.state.last_seq):
                        yield event
                known = {key: entry.revision for key, entry in listing.items()}
                pause = BACKOFF[0]
                while not self._closed:
                    if self._nc.stats["reconnects"] != reconnects:
                        raise _Stale("the connection was re-established")
                    with self._errors(f"watch {prefix!r}"):
                        msg = await feed.next(timeout=min(1.0, self._heartbeat))
                    if msg is None:
                        if loop.time() - feed.last_seen > 3 * self._heartbeat:
                            raise _Stale("no heartbeat from the consumer")
                        continue
                    record = self._parse(bucket, want, msg)
                    if record is None:
                        continue
                    if record.deleted:
                        if known.pop(record.key, None) is not None:
                            yield WatchEvent(EventKind.DELETE, record.key, b"", record.seq)
                    elif known.get(record.key) != record.revision:  # equal: a keepalive copy
                        known[record.key] = record.revision
                        yield WatchEvent(EventKind.PUT, record.key, record.value, record.revision)
            except _Stale as err:
                reason, delay = str(err), 0.0
            except KVUnavailableError as err:
                reason, delay, pause = str(err), pause, min(pause * 2, BACKOFF[1])
            finally:
                if feed is not None:
                    await feed.close()
            if self._closed:
                return
            log.info("kvstore watch lists again backend=nats prefix=%s reason=%r", prefix, reason)
            await asyncio.sleep(delay)

    async def close(self) -> None:
        """End every watch and close the connection."""
        self._closed = True
        for watch in builtins.list(self._watches):
            await watch.aclose()
        with contextlib.suppress(Exception):
            await self._nc.close()
