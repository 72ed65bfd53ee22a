"""The node-local API (ARCHITECTURE.md §3): the node's proxies talk to the datapath agent over a unix
socket, one JSON object per line each way — never over NATS, so it works with the control plane down.

Requests (the answer to each is a JSON object with "ok"; an error has "error"):
  {"op": "register_proxy", "type": "dns"|"http", "port": 10053, "mode": "tproxy"|"dnat"} -> {"ok": true}
      (the registration lasts as long as the connection: a proxy that dies fails closed)
  {"op": "allow_fqdn", "ips": {"198.51.100.10": ["api.github.com"]}}  -> {"ok": true, "written": 3}
  {"op": "forget_fqdn", "ips": {"198.51.100.10": ["api.github.com"]}} -> {"ok": true, "written": 3}   (null: every name)
  {"op": "ips_in_use", "ips": ["198.51.100.10"]}                       -> {"ok": true, "ips": [...]}     (open connections)
  {"op": "check", "src": "10.0.1.20", "dst": "10.0.1.10", "port": 80, "proto": 6,
   "http": {"method": "POST", "path": "/v1/x", "host": "h", "headers": {...}} | "dns": {"query": "a.b."}}
                                                                       -> {"ok": true, "allowed": ..., "reason": ..., "src_identity": ...}
  {"op": "flow", "flow": {... Hubble JSON ...}}                        -> {"ok": true}   (a proxy's flow: kept and published)
  {"op": "identity", "ip": "10.0.1.20"}                                -> {"ok": true, "identity": 25698, "labels": [...]}
  {"op": "ping"}                                                       -> {"ok": true, "node": "..."}
  {"op": "l7_policy", "src": "10.0.1.20", "dst": "10.0.1.10", "port": 80, "proto": 6}
                                   -> {"ok": true, "revision": N, "checks": [...], "source": {...}, ...}
      (the L7 rules of every direction that redirects this traffic, for the HTTP proxy to apply and
       cache while the datapath's policy revision stays N; see Agent.l7_policy)
  {"op": "flows", "flows": [{...}, ...]}                               -> {"ok": true, "count": 2}  (flow, batched)
For the DNS proxy:
  {"op": "dns_policy", "src": "10.0.1.20", "dst": "10.0.0.10"}        -> {"ok": true, "ready": ..., "generation": 7,
      "src": {peer}|null, "dst": {peer}, "enforced": ..., "filters": [...], "fqdn_selectors": [...]}
      (everything needed to judge queries from src to the server dst locally: Agent.dns_policy)
  {"op": "peer", "ip": "10.0.0.10"}                                    -> {"ok": true, "identity": ..., "labels": [...],
                                                                           "namespace": ..., "pod_name": ..., "id": ...}
  {"op": "fqdn_list"}                                                  -> {"ok": true, "ips": {"198.51.100.10": [names]}}
  {"op": "watch"}                    -> {"ok": true, "generation": 7}, then {"generation": 8} ... whenever it changes;
                                        the connection does nothing else afterwards (a registration made on it
                                        earlier lasts as long as it stays open)
The answer to `allow_fqdn` is sent only after the maps are written. An agent that shuts down keeps
the proxies' registrations (it restores them at start); only a proxy's own disconnect ends one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the proxies import this module for `socket_path`: it stays light to import
    from services.datapath.agent import Agent

log = logging.getLogger("cilia.datapath.localapi")

SOCKET_DIR = Path("/run/cilia")
MAX_LINE = 1 << 20


def socket_path(node: str) -> Path:
    return SOCKET_DIR / f"{node}.sock"


FlowSink = Callable[[dict[str, Any]], Awaitable[None]]


async def handle(
    agent: Agent, request: dict[str, Any], registered: set[int] | None = None, on_flow: FlowSink | None = None
) -> dict[str, Any]:
    op = request.get("op")
    if op == "ping":
        return {"ok": True, "node": agent.node}
    if op == "register_proxy":
        port = int(request["port"])
        await agent.register_proxy(str(request.get("type")), port, str(request.get("mode", "dnat")))
        if registered is not None:
            registered.add(port)
        return {"ok": True}
    if op == "allow_fqdn":
        ips = request.get("ips") or {}
        if not isinstance(ips, dict):
            return {"ok": False, "error": "ips must map addresses to name lists"}
        written = await agent.allow_fqdn_ips({str(k): [str(n) for n in v] for k, v in ips.items()})
        return {"ok": True, "written": written}
    if op == "forget_fqdn":
        ips = request.get("ips") or {}
        written = await agent.forget_fqdn_ips(
            {str(k): (None if v is None else [str(n) for n in v]) for k, v in ips.items()}
        )
        return {"ok": True, "written": written}
    if op == "ips_in_use":
        return {
            "ok": True,
            "ips": await asyncio.to_thread(agent.ips_in_use, [str(x) for x in request.get("ips") or []]),
        }
    if op == "check":
        from cilia.policy.l7 import DNSQuery, HTTPRequest, L7Request

        l7: L7Request
        if "http" in request:
            h = request["http"] or {}
            l7 = HTTPRequest(
                str(h.get("method", "GET")),
                str(h.get("path", "/")),
                str(h.get("host", "")),
                dict(h.get("headers") or {}),
            )
        elif "dns" in request:
            l7 = DNSQuery(str((request["dns"] or {}).get("query", "")))
        else:
            return {"ok": False, "error": "check needs http or dns"}
        return agent.check_l7(
            str(request["src"]), str(request["dst"]), int(request["port"]), int(request.get("proto", 6)), l7
        )
    if op == "flow":
        if on_flow is not None and isinstance(request.get("flow"), dict):
            await on_flow(request["flow"])
        return {"ok": True}
    if op == "l7_policy":
        return agent.l7_policy(
            str(request["src"]), str(request["dst"]), int(request["port"]), int(request.get("proto", 6))
        )
    if op == "flows":
        batch = request.get("flows") or []
        if not isinstance(batch, list):
            return {"ok": False, "error": "flows must be a list of flow objects"}
        flows = [f for f in batch if isinstance(f, dict)]
        if on_flow is not None:
            for f in flows:
                await on_flow(f)
        return {"ok": True, "count": len(flows)}
    if op == "identity":
        ip = str(request.get("ip"))
        ident = agent.identity_of_ip(ip)
        return {"ok": True, "identity": ident, "labels": agent.identity_labels(ident)}
    if op == "dns_policy":
        return agent.dns_policy(str(request["src"]), str(request["dst"]))
    if op == "peer":
        return {"ok": True, **agent.peer_info(str(request["ip"]))}
    if op == "fqdn_list":
        return {"ok": True, "ips": agent.fqdn_ips()}
    return {"ok": False, "error": f"unknown op {op!r}"}


async def _watch(agent: Agent, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Stream the agent's generation on this connection until the client goes away."""
    seen = agent.generation
    writer.write(json.dumps({"ok": True, "generation": seen}).encode() + b"\n")
    await writer.drain()
    gone = asyncio.ensure_future(reader.read(1))  # b"" (or an error) when the client closes
    try:
        while True:
            changed = asyncio.ensure_future(agent.wait_generation(seen))
            done, _ = await asyncio.wait({gone, changed}, return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                changed.cancel()
                return
            seen = changed.result()
            writer.write(json.dumps({"generation": seen}).encode() + b"\n")
            await writer.drain()
    finally:
        gone.cancel()


async def serve(agent: Agent, path: Path, on_flow: FlowSink | None = None) -> asyncio.AbstractServer:
    """Listen on `path` (mode 0600: the node's root processes only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

    # Connections holding each port's registration: a proxy restarted by starting the new process
    # before stopping the old one (both bound with SO_REUSEPORT) never loses its redirect.
    holders: dict[int, int] = {}

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A proxy's registration lives as long as its connection: if the proxy dies, its
        # redirects fail closed again.
        registered: set[int] = set()
        shutting_down = False
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    if request.get("op") == "watch":
                        await _watch(agent, reader, writer)
                        break
                    before = set(registered)
                    answer = await handle(agent, request, registered, on_flow)
                    for port in registered - before:
                        holders[port] = holders.get(port, 0) + 1
                except Exception as err:
                    answer = {"ok": False, "error": f"{type(err).__name__}: {err}"}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        except asyncio.CancelledError:
            # The agent is shutting down, not the proxy: its redirects stay (restored at start).
            shutting_down = True
            raise
        finally:
            writer.close()
            for port in registered:
                holders[port] = holders.get(port, 1) - 1
                if holders[port] > 0 or shutting_down:
                    continue
                del holders[port]
                with contextlib.suppress(Exception):
                    await agent.unregister_proxy(port)

    server = await asyncio.start_unix_server(client, path=str(path), limit=MAX_LINE)
    os.chmod(path, 0o600)
    return server


class LocalClient:
    """What a proxy uses: one connection, requests answered in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def request(self, payload: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
        async with self._lock:
            for attempt in range(2):
                try:
                    if self._writer is None:
                        self._reader, self._writer = await asyncio.open_unix_connection(
                            str(self.path), limit=MAX_LINE
                        )
                    assert self._reader is not None
                    self._writer.write(json.dumps(payload).encode() + b"\n")
                    await self._writer.drain()
                    line = await asyncio.wait_for(self._reader.readline(), timeout)
                    if not line:
                        raise ConnectionError("the datapath agent closed the connection")
                    answer: dict[str, Any] = json.loads(line)
                    return answer
                except (OSError, ConnectionError):
                    await self.close()
                    if attempt:
                        raise
        raise ConnectionError("unreachable")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._reader = self._writer = None
