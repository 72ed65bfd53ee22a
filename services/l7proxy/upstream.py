"""Upstream sockets that carry the client's identity: SO_MARK set before connect.

mitmproxy 11 opens server connections with `asyncio.open_connection(host, port, local_addr=...)`
(proxy/server.py, `ConnectionHandler.open_connection`) and has no socket factory and no source
spoofing. The narrowest hook is the event loop's `create_connection`, which that call ends in: the
data plane runs on a `MarkingEventLoop`, and the addon's `server_connect` hook, awaited in the same
task just before the connect, puts the mark in `UPSTREAM_MARK` (a context variable, so it is local
to that one connection's task). Connections opened without a mark (none are, in the proxy) take
asyncio's ordinary path. The datapath trusts the mark only from the node's own processes
(docs/datapath.md, "Marks"), so the destination's ingress policy judges the client's identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from contextvars import ContextVar
from typing import Any

UPSTREAM_MARK: ContextVar[int | None] = ContextVar("cilia_upstream_mark", default=None)
CONNECT_TIMEOUT = 5.0


class UpstreamConnectError(OSError):
    """The marked upstream connection could not be opened (refused, timed out, unreachable)."""


class MarkingEventLoop(asyncio.SelectorEventLoop):
    """A selector loop whose TCP connects set SO_MARK to `UPSTREAM_MARK` when it is set."""

    connect_timeout: float = CONNECT_TIMEOUT

    async def create_connection(
        self,
        protocol_factory: Any,
        host: str | None = None,
        port: int | None = None,
        *,
        sock: socket.socket | None = None,
        local_addr: tuple[str, int] | None = None,
        **kwargs: Any,
    ) -> Any:
        mark = UPSTREAM_MARK.get()
        if sock is not None:
            return await super().create_connection(protocol_factory, sock=sock, **kwargs)
        if mark is None or host is None or port is None:
            return await super().create_connection(
                protocol_factory,
                host,  # type: ignore[arg-type]
                port,  # type: ignore[arg-type]
                local_addr=local_addr,
                **kwargs,
            )
        marked = await self.marked_connect(host, port, mark, local_addr)
        return await super().create_connection(protocol_factory, sock=marked, **kwargs)

    async def marked_connect(
        self, host: str, port: int, mark: int, local_addr: tuple[str, int] | None = None
    ) -> socket.socket:
        """A connected non-blocking TCP socket to (host, port) whose packets carry `mark`."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.setblocking(False)
            if local_addr is not None:
                sock.bind(local_addr)
            await asyncio.wait_for(self.sock_connect(sock, (host, port)), self.connect_timeout)
        except TimeoutError:
            sock.close()
            raise UpstreamConnectError(
                f"connect to {host}:{port} timed out after {self.connect_timeout}s"
            ) from None
        except OSError as err:
            sock.close()
            raise UpstreamConnectError(
                err.errno, f"connect to {host}:{port}: {err.strerror or err}"
            ) from None
        except BaseException:
            with contextlib.suppress(OSError):
                sock.close()
            raise
        return sock
