"""The cilia addon: mitmproxy hooks that put Cilium's HTTP policy on every redirected request.

The hooks stay small; the decisions are pure functions elsewhere (`policy.decide`, the flows in
`httpflows`). Per connection the addon remembers the client and its original destination; per
request it asks the policy cache for the rules of (client, destination, port), answers `403
Access denied` itself or lets the request go on with Envoy's header edits, marks the upstream
socket with the client's identity (`server_connect`), and emits the request and response flows.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from functools import partial
from typing import TYPE_CHECKING, Any

from mitmproxy import connection, http
from mitmproxy.proxy import layer
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from services.datapath.maps import from_proxy_mark
from services.l7proxy.agentlink import PolicyCache
from services.l7proxy.httpflows import (
    Connection,
    Exchange,
    protocol_name,
    request_flow,
    response_flow,
    url_of,
)
from services.l7proxy.layers import DENIED, CiliaHttpLayer, Limits, ServerRegistry
from services.l7proxy.metrics import ProxyMetrics
from services.l7proxy.policy import Decision, PolicyAnswerError, PortPolicy, decide
from services.l7proxy.upstream import UPSTREAM_MARK

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("cilia.l7proxy")

ACCESS_DENIED = b"Access denied\r\n"  # what Cilium's Envoy answers (15 bytes, text/plain)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
META_START = "cilia.start_ns"
META_POLICY = "cilia.policy"
META_DECISION = "cilia.decision"
META_EXCHANGE = "cilia.exchange"
META_RESPONDED = "cilia.responded"


def access_denied() -> http.Response:
    """Cilium's 403: `Access denied\\r\\n`, text/plain; the connection stays open."""
    return http.Response.make(
        403, ACCESS_DENIED, {"content-type": "text/plain", "date": formatdate(usegmt=True)}
    )


@dataclass
class ConnState:
    """One redirected client connection."""

    conn: Connection
    mark: int | None = None
    requests: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class HttpOnlyNextLayer:
    """The proxy's `nextlayer` addon: a redirected connection is HTTP, always (HTTP/2 with prior
    knowledge when it starts with the preface); nothing is ever passed through uninspected."""

    name = "nextlayer"

    def __init__(self, limits: Limits, registry: ServerRegistry) -> None:
        self.limits = limits
        self.registry = registry

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer is not None:
            return
        data = nextlayer.data_client()
        if len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
            return  # could still be the HTTP/2 preface: wait for more bytes
        if data.startswith(H2_PREFACE):
            nextlayer.context.client.alpn = b"h2"
        nextlayer.layer = CiliaHttpLayer(nextlayer.context, self.limits, self.registry)


class CiliaAddon:
    """Policy, marks, flows and metrics for every request through the proxy."""

    name = "cilia"

    def __init__(
        self,
        node: str,
        cache: PolicyCache,
        metrics: ProxyMetrics,
        emit: Callable[[Callable[[], dict[str, Any]]], None],
        max_connections: int,
        handler_of: Callable[[connection.Client], Any],
    ) -> None:
        self.node = node
        self.cache = cache
        self.metrics = metrics
        self.emit = emit
        self.max_connections = max_connections
        self.handler_of = handler_of
        self.conns: dict[str, ConnState] = {}

    # --- connections ------------------------------------------------------------------------

    def client_connected(self, client: connection.Client) -> None:
        if len(self.conns) >= self.max_connections:
            client.error = "too many connections"
            self.metrics.closed.labels("too-many-connections").inc()
            return
        handler = self.handler_of(client)
        io = handler.transports.get(client) if handler is not None else None
        local = io.writer.get_extra_info("sockname") if io is not None and io.writer is not None else None
        original = client.sockname  # mitmproxy put SO_ORIGINAL_DST there
        if local is None or tuple(local[:2]) == tuple(original[:2]):
            # Not redirected by the datapath (someone connected to the proxy port itself).
            client.error = "not a redirected connection"
            self.metrics.closed.labels("not-redirected").inc()
            return
        peer = client.peername
        self.conns[client.id] = ConnState(
            Connection(str(peer[0]), int(peer[1]), str(original[0]), int(original[1]))
        )
        self.metrics.connections.inc()

    def client_disconnected(self, client: connection.Client) -> None:
        if self.conns.pop(client.id, None) is not None:
            self.metrics.connections.dec()

    def server_connect(self, data: ServerConnectionHookData) -> None:
        st = self.conns.get(data.client.id)
        if st is None or st.mark is None:
            data.server.error = "no allowed request on this connection: not connecting upstream"
            return
        UPSTREAM_MARK.set(st.mark)  # read by MarkingEventLoop.create_connection, in this task

    # --- requests ---------------------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        st = self.conns.get(flow.client_conn.id)
        req = flow.request
        host = req.authority or req.headers.get("host", "")
        policy: PortPolicy | None = None
        if st is None:
            decision = Decision(False, "unknown connection")
        else:
            st.requests += 1
            hits = self.cache.hits
            try:
                policy = await self.cache.get(st.conn.src_ip, st.conn.dst_ip, st.conn.dst_port)
            except (PolicyAnswerError, OSError, TimeoutError) as err:
                decision = Decision(False, f"policy unavailable: {err}")
                log.warning(
                    "event=policy-unavailable src=%s dst=%s error=%r",
                    st.conn.src_ip,
                    st.conn.dst_ip,
                    str(err),
                )
            else:
                decision = decide(policy, req.method, req.path, host, list(req.headers.items(multi=True)))
            self.metrics.lookups.labels("hit" if self.cache.hits > hits else "miss").inc()
        if decision.allowed and policy is not None and st is not None:
            try:
                mark = from_proxy_mark(policy.src_identity, policy.ingress_applied)
            except ValueError as err:
                decision = Decision(False, f"cannot carry the source identity upstream: {err}")
            else:
                if st.mark is None:
                    st.mark = mark
        start_ns = time.time_ns()  # Envoy logs the request when its filter has decided
        request_id = req.headers.get("x-request-id") or str(uuid.uuid4())
        if decision.allowed:
            _apply(decision, req.headers)
            _strip_h2c_upgrade(req.headers)
            req.headers["x-request-id"] = request_id
            self.metrics.requests.labels("forwarded").inc()
        else:
            flow.metadata[DENIED] = True
            req.stream = False
            req.headers.pop("expect", None)  # answered at once: no 100 Continue
            flow.response = access_denied()
            self.metrics.requests.labels("denied").inc()
            log.debug(
                "event=request-denied src=%s method=%s path=%r reason=%r",
                st.conn.src_ip if st else "?",
                req.method,
                req.path,
                decision.reason,
            )
        if st is None:
            return
        exchange = Exchange(
            req.method,
            url_of(host, req.path, st.conn.dst_ip, st.conn.dst_port),
            protocol_name(req.http_version),
            tuple(
                [
                    *req.headers.items(multi=True),
                    *([] if "x-request-id" in req.headers else [("x-request-id", request_id)]),
                ]
            ),
        )
        flow.metadata[META_START] = start_ns
        flow.metadata[META_POLICY] = policy
        flow.metadata[META_DECISION] = decision
        flow.metadata[META_EXCHANGE] = exchange
        self.emit(
            partial(
                request_flow,
                node=self.node,
                conn=st.conn,
                exchange=exchange,
                **self._endpoints(policy, st),
                direction=policy.direction if policy else "INGRESS",
                allowed=decision.allowed,
                reason=decision.reason,
                time_ns=start_ns,
            )
        )

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            self._responded(flow, flow.response.status_code, list(flow.response.headers.items(multi=True)))

    def error(self, flow: http.HTTPFlow) -> None:
        # mitmproxy answers 502 when the destination cannot be reached; a client that went away gets nothing
        if flow.response is None and flow.error is not None and "client" not in flow.error.msg.lower():
            self._responded(flow, 502, [])

    def _responded(self, flow: http.HTTPFlow, code: int, headers: list[tuple[str, str]]) -> None:
        start_ns = flow.metadata.get(META_START)
        exchange = flow.metadata.get(META_EXCHANGE)
        if start_ns is None or exchange is None or flow.metadata.get(META_RESPONDED):
            return
        flow.metadata[META_RESPONDED] = True
        st = self.conns.get(flow.client_conn.id)
        if st is None:
            return
        now = time.time_ns()
        ts = flow.response.timestamp_start if flow.response is not None else None
        latency = int(ts * 1e9) - start_ns if ts else now - start_ns
        self.metrics.responses.labels(str(code)).inc()
        self.metrics.duration.observe(max(latency, 0) / 1e9)
        policy: PortPolicy | None = flow.metadata.get(META_POLICY)
        decision: Decision | None = flow.metadata.get(META_DECISION)
        self.emit(
            partial(
                response_flow,
                node=self.node,
                conn=st.conn,
                exchange=exchange,
                code=code,
                response_headers=headers,
                **self._endpoints(policy, st),
                direction=policy.direction if policy else "INGRESS",
                latency_ns=latency,
                time_ns=now,
                reason=decision.reason if decision is not None else "",
            )
        )

    @staticmethod
    def _endpoints(policy: PortPolicy | None, st: ConnState) -> dict[str, Any]:
        if policy is None:
            return {"source": {}, "destination": {}}
        return {
            "source": policy.source,
            "destination": policy.destination,
            "source_names": policy.source_names,
            "destination_names": policy.destination_names,
        }


def _apply(decision: Decision, headers: http.Headers) -> None:
    """The header edits of the mismatch actions, in the order Envoy made them."""
    for edit in decision.edits:
        if edit.action == "add":
            headers.add(edit.name, edit.value)
        elif edit.action == "remove":
            headers.pop(edit.name, None)
        else:
            headers[edit.name] = edit.value


def _strip_h2c_upgrade(headers: http.Headers) -> None:
    """An HTTP/1.1 request may not switch this connection to h2c: the proxy would lose sight of the
    requests that follow. Envoy drops such upgrade headers too; the request goes on as HTTP/1.1."""
    if headers.get("upgrade", "").lower() == "h2c":
        headers.pop("upgrade", None)
        headers.pop("http2-settings", None)
        conn = [t.strip() for t in headers.get("connection", "").split(",")]
        rest = [t for t in conn if t and t.lower() not in ("upgrade", "http2-settings")]
        if rest:
            headers["connection"] = ", ".join(rest)
        else:
            headers.pop("connection", None)
