"""mitmproxy protocol layers with the limits and the early answer a policy proxy needs.

mitmproxy's HTTP/1 server reads request heads without a size limit (a FIXME in its code) and
has no deadline for a head that arrives slowly; `BoundedHttp1Server` answers 431 to a head over
`max_header_bytes` and records when a head started (and when the connection went idle) so the
addon's sweeper can close slowloris and idle connections. `CiliaHttpStream` answers a denied
request that still has a body as soon as its headers are judged, as Cilium's Envoy does, and
reads the rest of the body into nothing: nothing of it goes upstream or stays in memory, and the
connection stays usable. `CiliaHttpLayer` puts both in place of mitmproxy's own classes; it is
the only layer the proxy ever runs on a redirected connection (see the addon's `next_layer`).
"""

from __future__ import annotations

import re
import time
import weakref
from dataclasses import dataclass

from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import HttpLayer, HTTPMode, HttpStream
from mitmproxy.proxy.layers.http._events import (
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestTrailers,
)
from mitmproxy.proxy.layers.http._hooks import HttpResponseHeadersHook
from mitmproxy.proxy.layers.http._http1 import Http1Server
from mitmproxy.proxy.utils import expect

DENIED = "cilia.denied"  # flow.metadata key the addon sets on a request it refused
_HEAD_END = re.compile(rb"\r?\n\r?\n")
TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
    b"content-length: 33\r\nconnection: close\r\n\r\nRequest header fields too large\r\n"
)


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 60 * 1024  # Envoy's max_request_headers_kb default
    headers_timeout: float = 10.0  # from a request head's first byte to its end
    idle_timeout: float = 60.0  # a keep-alive connection with no request in flight


class ServerRegistry:
    """The live HTTP/1 client-side connections, for the sweeper (weak: a closed one just vanishes)."""

    def __init__(self) -> None:
        self._servers: weakref.WeakSet[BoundedHttp1Server] = weakref.WeakSet()

    def add(self, server: BoundedHttp1Server) -> None:
        self._servers.add(server)

    def __len__(self) -> int:
        return len(self._servers)

    def overdue(self, now: float) -> list[tuple[BoundedHttp1Server, str]]:
        """Connections past a deadline: (server, "headers" | "idle")."""
        out = []
        for srv in list(self._servers):
            why = srv.overdue(now)
            if why is not None:
                out.append((srv, why))
        return out


class BoundedHttp1Server(Http1Server):
    """mitmproxy's HTTP/1 server side with a bounded request head and the times its deadlines need."""

    def __init__(self, context: Context, limits: Limits, registry: ServerRegistry | None = None) -> None:
        super().__init__(context)
        self.limits = limits
        self.head_since: float | None = None
        self.idle_since = time.monotonic()
        self.closed_for: str | None = None
        if registry is not None:
            registry.add(self)

    def overdue(self, now: float) -> str | None:
        if self.closed_for is not None or self.state != self.read_headers:
            return None
        if self.head_since is not None:
            return "headers" if now - self.head_since > self.limits.headers_timeout else None
        return "idle" if now - self.idle_since > self.limits.idle_timeout else None

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived) and self.buf:
            if self.head_since is None:
                self.head_since = time.monotonic()
            if len(self.buf) > self.limits.max_header_bytes and not self._head_fits():
                self.closed_for = "header-overflow"
                yield commands.SendData(self.conn, TOO_LARGE)
                yield commands.CloseConnection(self.conn)
                self.state = self.done
                return
        yield from super().read_headers(event)
        if self.state != self.read_headers:
            self.head_since = None

    def _head_fits(self) -> bool:
        m = _HEAD_END.search(bytes(self.buf))
        return m is not None and m.end() <= self.limits.max_header_bytes

    def mark_done(self, *, request: bool = False, response: bool = False) -> layer.CommandGenerator[None]:
        yield from super().mark_done(request=request, response=response)
        if self.state == self.read_headers and not self.buf:
            self.head_since = None
            self.idle_since = time.monotonic()


class CiliaHttpStream(HttpStream):
    """One request/response: a denied request with a body gets its 403 at once, its body is dropped."""

    @expect(RequestHeaders)
    def state_wait_for_request_headers(self, event: RequestHeaders) -> layer.CommandGenerator[None]:
        yield from super().state_wait_for_request_headers(event)
        if (
            self.flow.metadata.get(DENIED)
            and self.flow.response is not None
            and not event.end_stream
            and self.client_state == self.state_consume_request_body
        ):
            self.client_state = self.state_discard_request_body
            self.flow.response.timestamp_start = time.time()
            yield HttpResponseHeadersHook(self.flow)
            yield from self.send_response()

    @expect(RequestData, RequestTrailers, RequestEndOfMessage)
    def state_discard_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestEndOfMessage):
            self.flow.request.timestamp_end = time.time()
            self.client_state = self.state_done
            if self.server_state == self.state_done:
                yield from self.flow_done()
        # the data and trailers of a denied request go nowhere


class CiliaHttpLayer(HttpLayer):
    """The transparent HTTP layer, with the bounded HTTP/1 server and the early-answering stream."""

    def __init__(self, context: Context, limits: Limits, registry: ServerRegistry | None = None) -> None:
        super().__init__(context, HTTPMode.transparent)
        self.limits = limits
        self.registry = registry

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start) and self.context.client.alpn != b"h2":
            # HttpLayer keeps a client connection layer that is already there
            self.connections.setdefault(
                self.context.client, BoundedHttp1Server(self.context.fork(), self.limits, self.registry)
            )
        yield from super()._handle_event(event)

    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        stream = self.streams[stream_id] = CiliaHttpStream(self.context.fork(), stream_id)
        yield from self.event_to_child(stream, events.Start())
