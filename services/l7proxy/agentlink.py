"""The proxy's links to its node's datapath agent, all over the node-local unix socket (never NATS):
its registration, the L7 rules per connection (cached while the datapath's policy revision holds),
and its flows.

The registration lasts as long as its connection (the agent's rule: a proxy that dies fails
closed), so `keep_registered` holds one connection open and registers again whenever the agent
comes back. Rules: `PolicyCache` reads the revision the agent bumps after every map write from
the pinned BPF array (one bpf(2) lookup, no round trip) and asks the agent only when an entry for
(source, destination, port) at that revision is missing; a policy change therefore applies to the
very next request, also on an open connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from services.datapath import maps
from services.datapath.localapi import MAX_LINE
from services.l7proxy.policy import PolicyAnswerError, PortPolicy, parse_answer

log = logging.getLogger("cilia.l7proxy")


class AgentLink:
    """Requests to the agent on one connection, pipelined: many in flight, answers in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: collections.deque[asyncio.Future[dict[str, Any]]] = collections.deque()
        self._connecting = asyncio.Lock()
        self._reader_task: asyncio.Task[None] | None = None

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                reader, writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_LINE)
                self._reader, self._writer = reader, writer
                self._reader_task = asyncio.create_task(self._read(reader, writer), name="agent-link-reader")
            return self._writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        error: BaseException = ConnectionError("the datapath agent closed the connection")
        try:
            while line := await reader.readline():
                fut = self._pending.popleft() if self._pending else None
                if fut is not None and not fut.done():
                    try:
                        fut.set_result(json.loads(line))
                    except ValueError as err:
                        fut.set_exception(ConnectionError(f"unreadable answer from the agent: {err}"))
        except (OSError, ValueError) as err:
            error = ConnectionError(f"the connection to the datapath agent failed: {err}")
        finally:
            if self._writer is writer:
                self._reader = self._writer = None
            writer.close()
            while self._pending:
                fut = self._pending.popleft()
                if not fut.done():
                    fut.set_exception(error)

    async def request(self, payload: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
        writer = await self._connect()
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        writer.write(json.dumps(payload, separators=(",", ":")).encode() + b"\n")
        await writer.drain()
        return await asyncio.wait_for(fut, timeout)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task


class RegistrationError(Exception):
    """The agent refused the registration."""


async def keep_registered(
    path: Path, port: int, on_change: Callable[[bool], None], max_backoff: float = 1.0
) -> None:
    """Register as the node's HTTP proxy on `port` and stay registered: the registration lasts as
    long as this connection, so when the agent goes away, register again as soon as it is back."""
    backoff = 0.05
    last_error = ""
    while True:
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
            request = {"op": "register_proxy", "type": "http", "port": port, "mode": "dnat"}
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            answer = json.loads(await reader.readline() or b"{}")
            if not answer.get("ok"):
                raise RegistrationError(answer.get("error") or "no answer")
            log.info("event=proxy-registered port=%d socket=%s", port, path)
            on_change(True)
            backoff, last_error = 0.05, ""
            while await reader.read(4096):
                pass  # the agent sends nothing more: EOF means it went away
            log.warning("event=agent-gone socket=%s (registering again when it is back)", path)
        except (OSError, ValueError, RegistrationError) as err:
            # Say it once per kind of failure (an agent that is restarting refuses for a while).
            level = logging.WARNING if str(err) != last_error else logging.DEBUG
            log.log(level, "event=register-failed socket=%s error=%r retry_in=%.2fs", path, str(err), backoff)
            last_error = str(err)
        finally:
            on_change(False)
            if writer is not None:
                writer.close()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff)


class RevisionReader:
    """The datapath's policy revision from its pinned BPF array (None while it cannot be read)."""

    RETRY = 1.0

    def __init__(self, node: str) -> None:
        self.path = maps.pin_root(node) / maps.POLICY_REV
        self._map: maps.BPFMap[Any, Any] | None = None
        self._inode = 0
        self._next_try = 0.0

    def read(self) -> int | None:
        if self._map is None and not self._open():
            return None
        assert self._map is not None
        try:
            value = self._map.lookup(ctypes.c_uint32(0))
        except OSError:
            self.close()
            return None
        return int(value.value) if value is not None else 0

    def _open(self) -> bool:
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + self.RETRY
        try:
            self._inode = os.stat(self.path).st_ino
            self._map = maps.BPFMap(self.path, ctypes.c_uint32, ctypes.c_uint32)
        except OSError:
            self._map = None
            return False
        return True

    def refresh(self) -> None:
        """Reopen if the pin was replaced (an agent that recreated its maps)."""
        try:
            inode = os.stat(self.path).st_ino
        except OSError:
            inode = 0
        if self._map is not None and inode != self._inode:
            self.close()
            self._next_try = 0.0

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._map = None


Fetch = Callable[[str, str, int], Awaitable[dict[str, Any]]]


class PolicyCache:
    """`PortPolicy` per (source IP, destination IP, port), valid for one policy revision."""

    def __init__(
        self, fetch: Fetch, revision: Callable[[], int | None], enabled: bool = True, max_entries: int = 65536
    ) -> None:
        self.fetch = fetch
        self.revision = revision
        self.enabled = enabled
        self.max_entries = max_entries
        self.rev: int | None = None
        self.entries: dict[tuple[str, str, int], PortPolicy] = {}
        self.inflight: dict[tuple[str, str, int], asyncio.Future[PortPolicy]] = {}
        self.hits = 0
        self.misses = 0

    async def get(self, src: str, dst: str, port: int) -> PortPolicy:
        """The rules for this traffic now; PolicyAnswerError or ConnectionError if the agent cannot say."""
        rev = self.revision() if self.enabled else None
        key = (src, dst, port)
        if rev is not None:
            if rev != self.rev:
                self.entries.clear()
                self.rev = rev
            hit = self.entries.get(key)
            if hit is not None:
                self.hits += 1
                return hit
        self.misses += 1
        waiting = self.inflight.get(key) if rev is not None else None
        if waiting is not None:
            return await asyncio.shield(waiting)
        fut: asyncio.Future[PortPolicy] = asyncio.get_running_loop().create_future()
        if rev is not None:
            self.inflight[key] = fut
        try:
            policy = parse_answer(await self.fetch(src, dst, port))
            if rev is not None and policy.revision == self.rev:
                if len(self.entries) >= self.max_entries:
                    self.entries.clear()
                self.entries[key] = policy
            fut.set_result(policy)
            return policy
        except BaseException as err:
            fut.set_exception(err if isinstance(err, Exception) else PolicyAnswerError("cancelled"))
            fut.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            if self.inflight.get(key) is fut:
                del self.inflight[key]


FlowMaker = Callable[[], dict[str, Any]]


class FlowSink:
    """Flows to the agent in batches, from a bounded queue: when the agent cannot keep up, flows
    are dropped (and counted), requests never wait. Flows are queued as makers and built here,
    off the request's path."""

    BATCH = 256
    LINGER = 0.05  # wait this long for a batch to fill: one round trip per batch, not per flow

    def __init__(self, link: AgentLink, maxsize: int, on_drop: Callable[[int], None]) -> None:
        self.link = link
        self.queue: asyncio.Queue[FlowMaker] = asyncio.Queue(maxsize)
        self.on_drop = on_drop

    def put(self, flow: FlowMaker) -> None:
        try:
            self.queue.put_nowait(flow)
        except asyncio.QueueFull:
            self.on_drop(1)

    async def run(self) -> None:
        while True:
            makers = [await self.queue.get()]
            if self.queue.qsize() < self.BATCH - 1:
                await asyncio.sleep(self.LINGER)
            while len(makers) < self.BATCH and not self.queue.empty():
                makers.append(self.queue.get_nowait())
            batch = []
            for make in makers:
                try:
                    batch.append(make())
                except Exception:
                    log.exception("event=flow-build-failed")
            try:
                answer = await self.link.request({"op": "flows", "flows": batch}, timeout=5.0)
                if not answer.get("ok"):
                    raise PolicyAnswerError(str(answer.get("error")))
            except (OSError, ConnectionError, TimeoutError, PolicyAnswerError) as err:
                self.on_drop(len(batch))
                log.debug("event=flows-dropped count=%d error=%r", len(batch), str(err))
                await asyncio.sleep(0.2)
