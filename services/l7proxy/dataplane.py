"""The proxy's data plane: mitmproxy's proxy core on an event loop of its own, on a thread that
entered the node's network namespace.

The API (FastAPI) runs in the process's namespace; the listener and every upstream connection
must be in the node's (`CILIA_NODE_NETNS`, where the datapath's nft rule sends redirected
connections), and setns() moves only the calling thread. So the data plane's thread enters the
namespace first and everything it opens stays there. Its loop is a `MarkingEventLoop` (upstream
sockets carry the client's identity), and it also runs the proxy's links to the agent: the
registration, the flow sink, and the sweeper that closes slow and idle connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import connection, options
from mitmproxy.addons import proxyserver
from mitmproxy.master import Master

from services.datapath import localapi
from services.l7proxy.addon import CiliaAddon, HttpOnlyNextLayer
from services.l7proxy.agentlink import AgentLink, FlowSink, PolicyCache, RevisionReader, keep_registered
from services.l7proxy.layers import Limits, ServerRegistry
from services.l7proxy.metrics import ProxyMetrics
from services.l7proxy.upstream import MarkingEventLoop

log = logging.getLogger("cilia.l7proxy")

SWEEP_INTERVAL = 0.5


@dataclass(frozen=True)
class DataPlaneConfig:
    node: str
    port: int
    listen_address: str = "0.0.0.0"
    netns: str | None = None
    limits: Limits = field(default_factory=Limits)
    connect_timeout: float = 5.0
    max_connections: int = 10000
    stream_bodies_over: str = "64k"
    rule_cache: bool = True
    flow_queue: int = 10000
    socket_path: Path | None = None
    profile: Path | None = None  # write cProfile stats of the data-plane thread here at stop

    @property
    def netns_path(self) -> str | None:
        if not self.netns:
            return None
        return self.netns if self.netns.startswith("/") else f"/run/netns/{self.netns}"

    @property
    def agent_socket(self) -> Path:
        return self.socket_path or localapi.socket_path(self.node)


class DataPlaneError(RuntimeError):
    """The data plane could not start (namespace, listener)."""


class _Stopped(Exception):
    """Ends the data plane's task group: stop() was called, or mitmproxy's master ended."""


class DataPlane:
    """mitmproxy with the cilia addon, run on its own thread in the node's network namespace."""

    def __init__(self, config: DataPlaneConfig, metrics: ProxyMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.registered = False
        self.listening = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.master: Master | None = None
        self.cache: PolicyCache | None = None
        self.registry = ServerRegistry()
        self.addon: CiliaAddon | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._closing: set[asyncio.Task[None]] = set()

    # --- life cycle (called from the API's thread) --------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the thread and wait until the proxy listens; DataPlaneError if it cannot."""
        self._thread = threading.Thread(target=self._thread_main, name="l7proxy-dataplane", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.listening.wait(0.05):
            if self.error is not None or not self._thread.is_alive():
                raise DataPlaneError(f"the data plane did not start: {self.error!r}")
            if time.monotonic() > deadline:
                raise DataPlaneError(f"the data plane did not listen within {timeout}s")

    def stop(self, timeout: float = 5.0) -> None:
        loop, stop = self.loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def status(self) -> dict[str, Any]:
        cache = self.cache
        return {
            "node": self.config.node,
            "port": self.config.port,
            "netns": self.config.netns,
            "listening": self.listening.is_set(),
            "registered": self.registered,
            "connections": len(self.addon.conns) if self.addon is not None else 0,
            "policy_cache": None
            if cache is None
            else {
                "enabled": cache.enabled,
                "revision": cache.rev,
                "entries": len(cache.entries),
                "hits": cache.hits,
                "misses": cache.misses,
            },
        }

    # --- the thread -----------------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            path = self.config.netns_path
            if path is None:
                self._run()
            else:
                from services.datapath.plumbing import _in_netns

                _in_netns(path, self._run)
        except BaseException as err:
            self.error = err
            log.error("event=dataplane-failed error=%r", str(err))

    def _run(self) -> None:
        loop = MarkingEventLoop()
        loop.connect_timeout = self.config.connect_timeout
        self.loop = loop
        asyncio.set_event_loop(loop)
        profiler = cProfile.Profile() if self.config.profile is not None else None
        if profiler is not None:
            profiler.enable()  # this thread only: where the proxy's time goes (bench/l7proxy.py --profile)
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            if profiler is not None and self.config.profile is not None:
                profiler.disable()
                profiler.dump_stats(str(self.config.profile))

    async def _main(self) -> None:
        cfg = self.config
        self._stop = asyncio.Event()
        link, flow_link = AgentLink(cfg.agent_socket), AgentLink(cfg.agent_socket)
        revisions = RevisionReader(cfg.node)

        async def fetch(src: str, dst: str, port: int) -> dict[str, Any]:
            return await link.request({"op": "l7_policy", "src": src, "dst": dst, "port": port, "proto": 6})

        self.cache = PolicyCache(fetch, revisions.read, enabled=cfg.rule_cache)
        sink = FlowSink(flow_link, cfg.flow_queue, self.metrics.flows_dropped.inc)
        opts = options.Options(mode=[f"transparent@{cfg.listen_address}:{cfg.port}"])
        master = self.master = Master(opts)
        ps = proxyserver.Proxyserver()

        def handler_of(client: connection.Client) -> Any:
            return ps.connections.get(client.id)

        self.addon = CiliaAddon(cfg.node, self.cache, self.metrics, sink.put, cfg.max_connections, handler_of)
        master.addons.add(ps, HttpOnlyNextLayer(cfg.limits, self.registry), self.addon)
        opts.update(
            connection_strategy="lazy",  # a denied request never dials the destination
            stream_large_bodies=cfg.stream_bodies_over,  # bounded memory: larger bodies stream through
            rawtcp=False,  # a 101 to anything but WebSocket closes the connection: no blind tunnel
            websocket=True,
            http2=True,
            validate_inbound_headers=True,  # request smuggling (CL + TE, ...) gets a 400
        )
        running = asyncio.create_task(master.run(), name="mitmproxy")
        try:
            while not ps.listen_addrs():
                if running.done():
                    raise DataPlaneError(f"mitmproxy stopped: {running.exception()!r}")
                await asyncio.sleep(0.01)
            if not ps.listen_addrs():
                raise DataPlaneError(f"cannot listen on {cfg.listen_address}:{cfg.port}")
            log.info(
                "event=listening addr=%s:%d netns=%s cache=%s",
                cfg.listen_address,
                cfg.port,
                cfg.netns,
                cfg.rule_cache,
            )
            self.listening.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(keep_registered(cfg.agent_socket, cfg.port, self._registered), name="register")
                tg.create_task(sink.run(), name="flows")
                tg.create_task(self._sweep(ps, revisions), name="sweeper")
                tg.create_task(self._until_stopped(running), name="stop")
        except* _Stopped:
            pass
        finally:
            master.shutdown()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(running, 5)
            await link.close()
            await flow_link.close()
            revisions.close()

    async def _until_stopped(self, running: asyncio.Task[None]) -> None:
        assert self._stop is not None
        stopped = asyncio.create_task(self._stop.wait())
        await asyncio.wait([stopped, running], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        raise _Stopped

    def _registered(self, on: bool) -> None:
        self.registered = on
        self.metrics.registered.set(1 if on else 0)

    async def _sweep(self, ps: proxyserver.Proxyserver, revisions: RevisionReader) -> None:
        """Close connections past a deadline (slow request heads, idle keep-alives); notice a
        re-created revision map."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            revisions.refresh()
            for srv, why in self.registry.overdue(time.monotonic()):
                srv.closed_for = why
                handler = ps.connections.get(srv.context.client.id)
                if handler is not None:
                    self.metrics.closed.labels("headers-timeout" if why == "headers" else "idle").inc()
                    closing = asyncio.create_task(handler.on_timeout())
                    self._closing.add(closing)
                    closing.add_done_callback(self._closing.discard)
