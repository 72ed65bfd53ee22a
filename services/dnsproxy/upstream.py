"""UDP sockets to the DNS servers pods ask, shared by the queries of one identity.

A socket per query would make every query a new connection for the datapath: a conntrack entry,
a policy verdict and trace events that the agent turns into flows, a thousand times a second at
1,000 qps. Instead, the queries of one identity (the socket's mark) to one server share a connected
socket, and answers find their query by the (rewritten, random) DNS ID and the question. The
socket is replaced every `rotate` seconds, so the source port still changes (what makes answers
hard to spoof off-path, with the ID), and one retired while queries wait on it closes when the
last is answered or gives up.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable

from services.dnsproxy import wire

Answer = tuple[bytes, wire.Message]


class UpstreamSocket:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        server: tuple[str, int],
        mark: int,
        on_malformed: Callable[[str], None],
    ) -> None:
        self.loop = loop
        self.server = server
        self.created = self.used = time.monotonic()
        self.retired = False
        self.on_malformed = on_malformed
        self.pending: dict[int, tuple[wire.Query, asyncio.Future[Answer]]] = {}
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.setblocking(False)
            sock.connect(server)
        except OSError:
            sock.close()
            raise
        self.sock: socket.socket | None = sock
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        sock = self.sock
        for _ in range(64):
            if sock is None:
                return
            try:
                data = sock.recv(wire.MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                # An ICMP error on the connected socket (the server is unreachable): every query
                # waiting on it went to that server.
                for _query, fut in self.pending.values():
                    if not fut.done():
                        fut.set_exception(OSError(err.errno, err.strerror))
                continue
            try:
                msg = wire.parse_message(data)
            except wire.Malformed as err:
                self.on_malformed(err.reason)
                continue
            entry = self.pending.get(msg.id)
            if entry is None or not msg.is_response or not wire.same_question(msg, entry[0].question):
                continue
            if not entry[1].done():
                entry[1].set_result((data, msg))

    async def ask(self, query: wire.Query, timeout: float) -> Answer:
        """Send `query` under a fresh ID and wait for its answer."""
        assert self.sock is not None
        self.used = time.monotonic()
        upstream_id = random.getrandbits(16)
        while upstream_id in self.pending:
            upstream_id = random.getrandbits(16)
        fut: asyncio.Future[Answer] = self.loop.create_future()
        self.pending[upstream_id] = (query, fut)
        try:
            self.sock.send(wire.with_id(query.raw, upstream_id))
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            del self.pending[upstream_id]
            if self.retired and not self.pending:
                self.close()

    def retire(self) -> None:
        """No new query; close once the waiting ones are done."""
        self.retired = True
        if not self.pending:
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None


class UpstreamPool:
    """The shared sockets, by (server, mark)."""

    def __init__(self, on_malformed: Callable[[str], None], rotate: float = 1.0, idle: float = 30.0) -> None:
        self.on_malformed = on_malformed
        self.rotate = rotate
        self.idle = idle
        self.sockets: dict[tuple[tuple[str, int], int], UpstreamSocket] = {}

    async def ask(self, query: wire.Query, server: tuple[str, int], mark: int, timeout: float) -> Answer:
        key = (server, mark)
        up = self.sockets.get(key)
        if up is None or up.sock is None or time.monotonic() - up.created > self.rotate:
            if up is not None:
                up.retire()
            up = self.sockets[key] = UpstreamSocket(
                asyncio.get_running_loop(), server, mark, self.on_malformed
            )
        return await up.ask(query, timeout)

    def collect(self) -> None:
        """Close the sockets nobody used for `idle` seconds."""
        now = time.monotonic()
        for key, up in list(self.sockets.items()):
            if not up.pending and now - up.used > self.idle:
                up.close()
                del self.sockets[key]

    def close(self) -> None:
        for up in self.sockets.values():
            up.close()
        self.sockets.clear()
