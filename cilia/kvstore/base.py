"""The kvstore contract: entries, leases, watch events and the `KVStore` protocol both backends implement.

Keys are '/'-separated strings whose first segment names a bucket (`identities/labels/<hash>`, see
`cilia.kvstore.keys`); values are bytes. A revision is a positive integer that changes on every write
of a key and only grows; compare revisions of one key for equality (compare-and-set), never across
backends. Every backend raises the errors of `cilia.kvstore.errors` and nothing else for I/O.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import enum
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from cilia.kvstore.errors import KVError


@dataclass(frozen=True, slots=True)
class Entry:
    """A key, its value and the revision at which that value was written."""

    key: str
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class Lease:
    """A time-to-live that keys can be put under: they vanish when it expires or is revoked."""

    id: int
    ttl: int


class EventKind(enum.Enum):
    """What a watch event says: a key was put or deleted, or the initial listing is complete."""

    PUT = "put"
    DELETE = "delete"
    LIST_DONE = "list-done"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One watch event; `value` is empty for DELETE and `key` is empty for LIST_DONE."""

    kind: EventKind
    key: str = ""
    value: bytes = b""
    revision: int = 0


LIST_DONE = WatchEvent(EventKind.LIST_DONE)


def check_revision(revision: int) -> None:
    """Compare-and-set takes a revision read from the store, which is always positive."""
    if revision < 1:
        raise KVError(
            f"revision {revision} was never read from the store: use create() for a key that must be absent"
        )


class _End:
    """Marks the end of a watch's queue."""


_END = _End()


class Watch:
    """One watch's events: `async for event in watch`; `aclose()` (or leaving `async with`) ends it.

    A task owned by this object reads the backend's event source into a bounded queue, so a reader
    can time out or be cancelled while waiting for the next event without ending the watch.
    """

    def __init__(
        self,
        source: Callable[[], AsyncGenerator[WatchEvent, None]],
        on_close: Callable[[Watch], None] | None = None,
        *,
        buffer: int = 1024,
    ) -> None:
        self._source = source
        self._on_close = on_close
        self._queue: asyncio.Queue[WatchEvent | Exception | _End] = asyncio.Queue(buffer)
        self._task: asyncio.Task[None] | None = None
        self._done = False

    def _start(self) -> None:
        if self._task is None and not self._done:
            self._task = asyncio.get_running_loop().create_task(self._pump(), name="kvstore-watch")

    async def _pump(self) -> None:
        try:
            async with contextlib.aclosing(self._source()) as events:
                async for event in events:
                    await self._queue.put(event)
        except Exception as err:  # handed to the reader, who sees it raised by __anext__
            await self._queue.put(err)
        else:
            await self._queue.put(_END)

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._done:
            raise StopAsyncIteration
        self._start()
        item = await self._queue.get()
        if isinstance(item, _End):
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, Exception):
            self._done = True
            raise item
        return item

    async def aclose(self) -> None:
        """Stop the watch: its task is cancelled and waiting readers see the end of the iteration."""
        self._done = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_END)
        if self._on_close is not None:
            self._on_close(self)

    async def __aenter__(self) -> Watch:
        self._start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class KVStore(Protocol):
    """A key-value store with compare-and-set, prefix watches and leases (NATS JetStream KV or etcd)."""

    async def get(self, key: str) -> Entry | None:
        """The key's entry, or None if it does not exist."""
        ...

    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        """Write the key unconditionally (under `lease` if given); returns the new revision."""
        ...

    async def create(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        """Write the key only if it does not exist (else KeyExistsError); returns the new revision."""
        ...

    async def update(self, key: str, value: bytes, revision: int, lease: Lease | None = None) -> int:
        """Write the key only if it is still at `revision` (else RevisionMismatchError)."""
        ...

    async def delete(self, key: str, revision: int | None = None) -> bool:
        """Delete the key; False if it did not exist. With `revision`, only if unchanged since then."""
        ...

    async def list(self, prefix: str) -> builtins.list[Entry]:
        """Every entry whose key starts with `prefix` (which starts with a whole bucket), sorted by key."""
        ...

    def watch(self, prefix: str) -> Watch:
        """PUT events for the current entries under `prefix`, LIST_DONE, then live PUT and DELETE events.

        The watch survives reconnects and server restarts: it resumes where it stopped, or lists again
        and reports the difference (PUT for new or changed keys, DELETE for keys that went away).
        """
        ...

    async def prepare(self, buckets: Iterable[str]) -> None:
        """Make these buckets ready for use where the store needs them made (NATS streams); the
        cluster services call it at start so that read-only clients find them."""
        ...

    async def grant(self, ttl_seconds: int) -> Lease:
        """A new lease that expires `ttl_seconds` after it was granted or last kept alive."""
        ...

    async def keepalive(self, lease: Lease) -> None:
        """Restart the lease's time-to-live; LeaseExpiredError if it already expired."""
        ...

    async def revoke(self, lease: Lease) -> None:
        """End the lease now, deleting its keys; a lease that already expired is not an error."""
        ...

    async def close(self) -> None:
        """End every watch and close the connection."""
        ...
