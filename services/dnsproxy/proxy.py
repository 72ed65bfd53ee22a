"""The transparent DNS proxy: queries in, verdicts, forwarding, FQDN updates, answers out.

The datapath marks a pod's DNS packets for the proxy port and nft's `tproxy` hands them to the
sockets here without rewriting them: UDP arrives on an IP_TRANSPARENT socket read with `recvmsg`
(IP_RECVORIGDSTADDR gives the server the pod asked), TCP on a transparent listener (`getsockname`
of the accepted socket is that server). Each query is judged against the pod's DNS rules
(policy.py); a denied one gets REFUSED (or NXDOMAIN) and goes nowhere. An allowed one is sent to
the original server from a socket marked with the pod's identity (the server's own ingress
policy sees the pod, not the node); its answer's IPs, when a `toFQDNs` selector matches the name,
go to the datapath, and the answer is released once the datapath has them (or after the deadline).
UDP answers leave from an IP_TRANSPARENT socket bound to the server's address, so the pod sees
the server answer. Malformed messages are dropped and counted; the proxy keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.datapath.maps import from_proxy_mark
from services.dnsproxy import flowlog, wire
from services.dnsproxy.agentlink import AgentConnection, AgentError, AgentLink, AgentUnavailable
from services.dnsproxy.cache import FQDNCache, Pair
from services.dnsproxy.metrics import Metrics
from services.dnsproxy.policy import DNSPolicy, FQDNSelectors
from services.dnsproxy.upstream import UpstreamPool

log = logging.getLogger("cilia.dnsproxy")

SOL_IP = 0
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
ORIGDST = struct.Struct("!HH4s8x")
PROTO_NUM = {"UDP": 17, "TCP": 6}
REPLY_SOCKETS = 256  # transparent reply sockets kept, one per DNS server address


@dataclass(frozen=True)
class ProxyConfig:
    node: str
    port: int = 10053
    reject_rcode: int = wire.RCODE_REFUSED
    response_max_delay: float = 0.1  # Cilium's --tofqdns-proxy-response-max-delay
    upstream_timeout: float = 2.0
    min_ttl: int = 0  # Cilium's --tofqdns-min-ttl
    max_ips_per_host: int = 1000  # Cilium's --tofqdns-endpoint-max-ip-per-hostname
    gc_interval: float = 1.0
    state_file: Path | None = None
    socket_path: Path = Path("/run/cilia/node.sock")
    flow_queue: int = 20000
    persist_interval: float = 0.25  # new or removed pairs are on disk within this
    refresh_save_interval: float = 5.0  # expiry refreshes only within this (restored with as much slack)
    link_wait: float = 0.5  # how long a query with no known rules waits for the agent


class FlowShipper:
    """Flows leave in batches on their own connection; with the agent away they are dropped (counted)."""

    def __init__(self, conn: AgentConnection, metrics: Metrics, limit: int) -> None:
        self.conn = conn
        self.metrics = metrics
        self.limit = limit
        self.queue: list[dict[str, Any]] = []
        self.wake = asyncio.Event()
        self.sent = 0

    def add(self, flow: dict[str, Any]) -> None:
        if len(self.queue) >= self.limit:
            self.metrics.flows.labels("dropped").inc()
            return
        self.queue.append(flow)
        self.wake.set()

    async def run(self, link: AgentLink) -> None:
        while True:
            await self.wake.wait()
            await asyncio.sleep(0.005)  # gather a batch
            self.wake.clear()
            batch, self.queue = self.queue[:2000], self.queue[2000:]
            if self.queue:
                self.wake.set()
            if not link.up.is_set():
                self.metrics.flows.labels("dropped").inc(len(batch))
                continue
            try:
                await self.conn.request({"op": "flows", "flows": batch}, timeout=5.0)
                self.metrics.flows.labels("sent").inc(len(batch))
                self.sent += len(batch)
            except (AgentUnavailable, AgentError) as err:
                self.metrics.flows.labels("dropped").inc(len(batch))
                log.debug("event=flows-dropped count=%d error=%r", len(batch), str(err))


class FQDNUpdates:
    """allow_fqdn requests, batched: the answers of concurrent queries wait on one map write."""

    def __init__(self, conn: AgentConnection, cache: FQDNCache, metrics: Metrics) -> None:
        self.conn = conn
        self.cache = cache
        self.metrics = metrics
        self.pending: dict[Pair, None] = {}
        self.waiters: list[asyncio.Future[None]] = []
        self.running: asyncio.Task[None] | None = None
        self.changed: Callable[[set[str]], None] | None = None

    def allow(self, pairs: list[Pair]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for p in pairs:
            self.pending[p] = None
        self.waiters.append(fut)
        if self.running is None or self.running.done():
            self.running = asyncio.create_task(self._flush())
        return fut

    async def _flush(self) -> None:
        while self.pending:
            pairs, waiters = list(self.pending), self.waiters
            self.pending, self.waiters = {}, []
            ips: dict[str, list[str]] = {}
            for ip, name in pairs:
                ips.setdefault(ip, []).append(name)
            start = time.monotonic()
            try:
                await self.conn.request({"op": "allow_fqdn", "ips": ips}, timeout=10.0)
            except (AgentUnavailable, AgentError) as err:
                for w in waiters:
                    if not w.done():
                        w.set_exception(AgentUnavailable(str(err)))
                continue
            self.metrics.fqdn_wait.observe(time.monotonic() - start)
            self.metrics.fqdn_updates.labels("allow").inc(len(pairs))
            self.cache.acked.update(pairs)
            if self.changed is not None:
                self.changed(set(ips))
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def forget(self, pairs: list[Pair]) -> None:
        ips: dict[str, list[str]] = {}
        for ip, name in pairs:
            ips.setdefault(ip, []).append(name)
        await self.conn.request({"op": "forget_fqdn", "ips": ips}, timeout=10.0)
        self.metrics.fqdn_updates.labels("forget").inc(len(pairs))
        if self.changed is not None:
            self.changed(set(ips))


class DNSProxy:
    """The data plane (one asyncio loop, on a thread in the node's network namespace)."""

    def __init__(self, cfg: ProxyConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.link = AgentLink(cfg.socket_path, cfg.port)
        self.cache = FQDNCache(cfg.min_ttl, cfg.max_ips_per_host)
        self.policies: dict[tuple[str, str], DNSPolicy] = {}
        self.stale: set[tuple[str, str]] = set()
        self.fetching: dict[tuple[str, str], asyncio.Future[DNSPolicy | None]] = {}
        self.selectors = FQDNSelectors()
        self.flows = FlowShipper(self.link.flows, metrics, cfg.flow_queue)
        self.upstreams = UpstreamPool(lambda reason: self.metrics.malformed.labels("server", reason).inc())
        self.updates = FQDNUpdates(self.link.fqdn, self.cache, metrics)
        self.updates.changed = self._ips_changed
        self.reply_sockets: dict[tuple[str, int], socket.socket] = {}
        self.udp: socket.socket | None = None
        self.tcp: asyncio.Server | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.inflight: set[asyncio.Future[None]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.link.generation_changed.append(self._generation_changed)
        self.link.on_connect.append(self.resync)
        # Metric children resolved once (labels() per query costs more than the increment).
        self._queries = {
            (v, p): metrics.queries.labels(v, p)
            for v in ("allowed", "denied", "error")
            for p in ("UDP", "TCP")
        }
        self._latency = {v: metrics.latency.labels(v) for v in ("allowed", "denied")}

    # --- start and stop --------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the transparent sockets (before registering: a redirect never meets no socket)."""
        self.loop = asyncio.get_running_loop()
        self._restore()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # a new proxy may start beside the old
        udp.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        udp.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        udp.bind(("127.0.0.1", self.cfg.port))
        udp.setblocking(False)
        self.udp = udp
        self.loop.add_reader(udp.fileno(), self._udp_readable)
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        lsock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        lsock.bind(("127.0.0.1", self.cfg.port))
        lsock.listen(1024)
        lsock.setblocking(False)
        self.tcp = await asyncio.start_server(self._tcp_client, sock=lsock, limit=wire.MAX_MESSAGE + 2)
        for coro in (self.link.run(), self.flows.run(self.link), self._gc_loop(), self._persist_loop()):
            self.tasks.append(asyncio.create_task(coro))
        log.info("event=listening port=%d protocols=udp,tcp mode=tproxy", self.cfg.port)

    async def stop(self, drain_seconds: float = 2.0) -> None:
        """Hand the port over, then finish what was asked: take the queries already queued on the
        UDP socket, close the listeners (the kernel sends new queries to a proxy started beside
        this one, SO_REUSEPORT, or the redirect fails closed until one binds), and let the queries
        in flight get their answers (bounded) while the link to the agent still runs."""
        if self.udp is not None and self.loop is not None:
            self.loop.remove_reader(self.udp.fileno())
            for _ in range(64):  # each call takes up to 64 datagrams; fewer: the queue is empty
                if self._udp_readable() < 64:
                    break
            self.udp.close()
            self.udp = None
        if self.tcp is not None:
            self.tcp.close()
        if self.inflight:
            await asyncio.wait(set(self.inflight), timeout=drain_seconds)
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.upstreams.close()
        for s in self.reply_sockets.values():
            s.close()
        self.link.close()
        self._save()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    # --- policies --------------------------------------------------------------------------

    def _generation_changed(self, _generation: int) -> None:
        # Everything may have changed; keep the old entries to answer with if the agent goes away.
        self.stale = set(self.policies)

    def _ips_changed(self, ips: set[str]) -> None:
        # An IP's identity changes when the proxy opens or forgets it: policies to it are stale.
        for key in self.policies:
            if key[1] in ips:
                self.stale.add(key)

    async def policy_for(self, src: str, dst: str) -> DNSPolicy | None:
        key = (src, dst)
        have = self.policies.get(key)
        if have is not None and key not in self.stale:
            return have
        if not self.link.up.is_set():
            if have is not None:
                return have
            # Nothing known yet (a proxy that just started, bound before it registered): the
            # agent is usually a moment away.
            try:
                await asyncio.wait_for(self.link.up.wait(), self.cfg.link_wait)
            except TimeoutError:
                return None
        pending = self.fetching.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(key, have))
            self.fetching[key] = pending
            pending.add_done_callback(lambda _f: self.fetching.pop(key, None))
        return await asyncio.shield(pending)

    async def _fetch(self, key: tuple[str, str], have: DNSPolicy | None) -> DNSPolicy | None:
        try:
            doc = await self.link.control.request({"op": "dns_policy", "src": key[0], "dst": key[1]}, 2.0)
        except (AgentUnavailable, AgentError) as err:
            log.debug("event=dns-policy-unavailable src=%s dst=%s error=%r", key[0], key[1], str(err))
            return have
        policy = DNSPolicy.from_json(doc)
        if not policy.ready:
            return have  # the agent is still starting: the last rules are better than none
        if policy.generation == self.link.generation or self.link.generation < 0:
            self.stale.discard(key)
        self.policies[key] = policy
        if policy.selectors.selectors != self.selectors.selectors:
            self.selectors = policy.selectors
            self._spawn(self._sync_selectors())
        return policy

    async def _sync_selectors(self) -> None:
        """New toFQDNs selectors: IPs already in the cache for names they match open now."""
        want = [p for p in self.cache.pairs() if p not in self.cache.acked and self.selectors.matching(p[1])]
        if want:
            with contextlib.suppress(AgentUnavailable, AgentError):
                await self.updates.allow(want)

    # --- UDP -------------------------------------------------------------------------------

    def _udp_readable(self) -> int:
        """Take up to 64 queued datagrams; returns how many it took."""
        assert self.udp is not None
        for taken in range(64):
            try:
                data, anc, _flags, client = self.udp.recvmsg(wire.MAX_MESSAGE, 64)
            except (BlockingIOError, InterruptedError):
                return taken
            except OSError as err:
                log.warning("event=udp-recv-failed error=%r", str(err))
                return taken
            orig = None
            for level, kind, value in anc:
                if level == SOL_IP and kind == IP_RECVORIGDSTADDR and len(value) >= 8:
                    _fam, port, addr, *_ = ORIGDST.unpack_from(value.ljust(16, b"\0"))
                    orig = (socket.inet_ntoa(addr), port)
            if orig is None or (orig[1] == self.cfg.port and orig[0].startswith("127.")):
                self.metrics.malformed.labels("client", "not-redirected").inc()
                continue
            try:
                query = wire.parse_query(data)
            except wire.Malformed as err:
                self.metrics.malformed.labels("client", err.reason).inc()
                continue
            self._spawn(self._udp_query(query, client, orig))
        return 64

    async def _udp_query(self, query: wire.Query, client: tuple[str, int], orig: tuple[str, int]) -> None:
        answer = await self.handle(query, client, orig, "UDP")
        if answer is not None:
            self._reply_udp(orig, client, answer)

    def _reply_udp(self, orig: tuple[str, int], client: tuple[str, int], data: bytes) -> None:
        sock = self.reply_sockets.get(orig)
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            sock.setblocking(False)
            try:
                sock.bind(orig)
            except OSError as err:
                sock.close()
                log.warning("event=reply-bind-failed server=%s:%d error=%r", *orig, str(err))
                return
            if len(self.reply_sockets) >= REPLY_SOCKETS:
                _, old = self.reply_sockets.popitem()
                old.close()
            self.reply_sockets[orig] = sock
        try:
            sock.sendto(data, client)
        except OSError as err:
            log.debug("event=reply-failed client=%s:%d error=%r", *client, str(err))

    # --- TCP -------------------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """DNS over TCP: length-prefixed queries, answered in order, each forwarded over TCP."""
        sock = writer.get_extra_info("socket")
        client = writer.get_extra_info("peername")
        orig = sock.getsockname() if sock is not None else None
        try:
            if orig is None or (orig[1] == self.cfg.port and orig[0].startswith("127.")):
                self.metrics.malformed.labels("client", "not-redirected").inc()
                return
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), 30.0)
                    data = await asyncio.wait_for(reader.readexactly(struct.unpack("!H", head)[0]), 5.0)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                try:
                    query = wire.parse_query(data, wire.MAX_MESSAGE)
                except wire.Malformed as err:
                    self.metrics.malformed.labels("client", err.reason).inc()
                    return  # a stream out of step cannot be trusted any further
                answer = await self.handle(query, client, orig, "TCP")
                if answer is None:
                    return
                writer.write(struct.pack("!H", len(answer)) + answer)
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    # --- the query -------------------------------------------------------------------------

    async def handle(
        self,
        query: wire.Query,
        client: tuple[str, int],
        orig: tuple[str, int],
        proto: str,
    ) -> bytes | None:
        """Judge, forward, learn, and return the answer for the client (None: send nothing)."""
        t0 = time.monotonic_ns()
        policy = await self.policy_for(client[0], orig[0])
        if policy is None:
            # No rules known for this pod and the agent cannot be asked: a transient failure.
            self._queries["error", proto].inc()
            return wire.error_reply(query, wire.RCODE_SERVFAIL)
        qname, qtype = query.name, query.question.type_name
        allowed, reason = policy.judge(PROTO_NUM[proto], orig[1], qname)
        src = policy.src
        dst = policy.dst
        now_ns = time.time_ns()
        if src is not None:
            self.flows.add(
                flowlog.request_flow(
                    now_ns=now_ns,
                    node=self.cfg.node,
                    src=src,
                    src_port=client[1],
                    dst=dst,
                    dst_port=orig[1],
                    proto=proto,
                    qname=qname,
                    qtype=qtype,
                    allowed=allowed,
                    reason=reason,
                )
            )
        if not allowed or src is None:
            self._queries["denied", proto].inc()
            self._latency["denied"].observe((time.monotonic_ns() - t0) / 1e9)
            return wire.error_reply(query, self.cfg.reject_rcode)
        t_up = time.monotonic_ns()
        try:
            raw, msg = await self.forward(query, orig, src.identity, proto)
        except wire.Malformed as err:
            self.metrics.malformed.labels("server", err.reason).inc()
            self.metrics.upstream_errors.labels("malformed").inc()
            self._queries["error", proto].inc()
            return wire.error_reply(query, wire.RCODE_SERVFAIL)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as err:
            self.metrics.upstream_errors.labels("timeout" if isinstance(err, TimeoutError) else "error").inc()
            self._queries["error", proto].inc()
            return wire.error_reply(query, wire.RCODE_SERVFAIL)
        t_back = time.monotonic_ns()
        details = wire.answer_details(raw, msg)
        if details.ips and not details.error and msg.rcode == wire.RCODE_NOERROR:
            pairs = self.cache.update(src.id, src.name, qname, details.ips, details.ttl, time.time())
            if self.selectors.matching(qname):
                need = [p for p in pairs if p not in self.cache.acked]
                if need:
                    await self._wait_ack(need)
        elif details.error:
            log.info("event=answer-not-learned name=%s error=%r", qname, details.error)
        answer = wire.with_id(raw, query.id)
        t_end = time.monotonic_ns()
        self.flows.add(
            flowlog.response_flow(
                now_ns=time.time_ns(),
                latency_ns=t_end - t0,
                node=self.cfg.node,
                src=src,
                src_port=client[1],
                dst=dst,
                dst_port=orig[1],
                proto=proto,
                qname=qname,
                qtype=qtype,
                rcode=msg.rcode,
                ips=details.ips,
                ttl=details.ttl,
                cnames=tuple(c for c in details.cnames),
                rrtypes=details.rrtypes,
            )
        )
        self._queries["allowed", proto].inc()
        self._latency["allowed"].observe((t_end - t0 - (t_back - t_up)) / 1e9)
        return answer

    async def _wait_ack(self, need: list[Pair]) -> None:
        fut = self.updates.allow(need)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.cfg.response_max_delay)
        except TimeoutError:
            self.metrics.deadline_exceeded.inc()
            fut.add_done_callback(_consume)
        except (AgentUnavailable, AgentError):
            self.metrics.deadline_exceeded.inc()

    async def forward(
        self, query: wire.Query, orig: tuple[str, int], identity: int, proto: str
    ) -> tuple[bytes, wire.Message]:
        """Ask the original server, from a socket marked with the pod's identity."""
        mark = from_proxy_mark(identity)
        if proto == "UDP":
            # A socket shared by this identity's queries to this server (services/dnsproxy/upstream.py).
            return await self.upstreams.ask(query, orig, mark, self.cfg.upstream_timeout)
        upstream_id = random.getrandbits(16)
        out = wire.with_id(query.raw, upstream_id)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.setblocking(False)
            async with asyncio.timeout(self.cfg.upstream_timeout):
                await loop.sock_connect(sock, orig)
                reader, writer = await asyncio.open_connection(sock=sock)
                try:
                    writer.write(struct.pack("!H", len(out)) + out)
                    await writer.drain()
                    while True:
                        n = struct.unpack("!H", await reader.readexactly(2))[0]
                        data = await reader.readexactly(n)
                        msg = wire.parse_message(data)
                        if (
                            msg.id == upstream_id
                            and msg.is_response
                            and wire.same_question(msg, query.question)
                        ):
                            return data, msg
                finally:
                    writer.close()
        finally:
            sock.close()
        raise AssertionError("unreachable")

    # --- the agent coming back, expiry, persistence ----------------------------------------

    async def resync(self) -> None:
        """After (re)registering: the agent gets exactly the live cache's selected pairs."""
        self.stale = set(self.policies)
        doc = await self.link.control.request({"op": "fqdn_list"}, timeout=5.0)
        held = {(ip, name) for ip, names in doc.get("ips", {}).items() for name in names}
        live = self.cache.pairs()
        self.cache.acked = held & live  # what the agent has: released through it when it expires
        missing = sorted(p for p in live - held if self.selectors.matching(p[1]))
        extra = sorted(held - live)
        for i in range(0, len(missing), 2000):
            await self.updates.allow(missing[i : i + 2000])
        if extra:
            # Opened by a previous run but unknown here (its cache file was lost): release them
            # through the usual path, which keeps those still in use.
            now = time.time()
            for ip, name in extra:
                self.cache.zombies.setdefault((ip, name), _zombie(now))
                self.cache.acked.add((ip, name))
        log.info(
            "event=resynced cache_pairs=%d sent=%d agent_had=%d unknown=%d",
            len(live),
            len(missing),
            len(held),
            len(extra),
        )

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.gc_interval)
            try:
                self.upstreams.collect()
                await self.collect()
            except (AgentUnavailable, AgentError) as err:
                log.debug("event=gc-deferred error=%r", str(err))
            except Exception:
                log.exception("event=gc-failed")
            self.metrics.cache_pairs.set(len(self.cache.pairs()))
            self.metrics.agent_up.set(1 if self.link.up.is_set() else 0)

    async def collect(self) -> None:
        """Expire lookups; forget in the datapath what no open connection uses any more."""
        self.cache.collect(time.time())
        # Zombies the datapath never had need no check.
        self.cache.forget([p for p in list(self.cache.zombies) if p not in self.cache.acked])
        if not self.cache.zombies or not self.link.up.is_set():
            return
        ips = sorted({ip for ip, _ in self.cache.zombies})
        doc = await self.link.control.request({"op": "ips_in_use", "ips": ips}, timeout=5.0)
        in_use = set(doc.get("ips", []))
        done = [p for p in self.cache.zombies if p[0] not in in_use]
        if done:
            await self.updates.forget(done)
            self.cache.forget(done)
            log.info(
                "event=fqdn-expired pairs=%d kept_for_connections=%d", len(done), len(self.cache.zombies)
            )

    def _restore(self) -> None:
        path = self.cfg.state_file
        if path is None or not path.exists():
            return
        try:
            self.cache.load_json(json.loads(path.read_text()), slack=self.cfg.refresh_save_interval)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("event=cache-restore-failed file=%s error=%r", path, str(err))
            return
        log.info("event=cache-restored file=%s pairs=%d", path, len(self.cache.pairs()))

    def _save(self, doc: dict[str, Any] | None = None) -> None:
        """Write the cache (a snapshot taken on the loop: the file is written off it)."""
        path = self.cfg.state_file
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc if doc is not None else self.cache.to_json(), separators=(",", ":")))
        tmp.replace(path)

    async def _persist_loop(self) -> None:
        """Save soon after pairs come or go; after mere expiry refreshes, at most every few seconds."""
        saved = (self.cache.version, self.cache.refreshed)
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.cfg.persist_interval)
            now = time.monotonic()
            if self.cache.version == saved[0] and (
                self.cache.refreshed == saved[1] or now - last < self.cfg.refresh_save_interval
            ):
                continue
            saved, last = (self.cache.version, self.cache.refreshed), now
            try:
                await asyncio.to_thread(self._save, self.cache.to_json())
            except OSError as err:
                log.warning("event=cache-save-failed error=%r", str(err))

    # --- views for the API -----------------------------------------------------------------

    def snapshot(self, endpoint: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        """`cilia fqdn cache list`: rows filtered by endpoint (id or ns/pod) and name pattern."""
        from cilia.policy.fqdn import match_pattern

        rows = []
        for row in self.cache.rows(time.time()):
            if endpoint and endpoint not in (str(row.endpoint), row.endpoint_name):
                continue
            if name and not match_pattern(name, row.name):
                continue
            rows.append(row.to_dict(list(self.selectors.matching(row.name))))
        return rows

    def status(self) -> dict[str, Any]:
        return {
            "port": self.cfg.port,
            "registered": self.link.up.is_set(),
            "generation": self.link.generation,
            "policies": len(self.policies),
            "cache_pairs": len(self.cache.pairs()),
            "acked_pairs": len(self.cache.acked),
            "zombies": len(self.cache.zombies),
            "flows_sent": self.flows.sent,
            "fqdn_selectors": [
                f"matchName: {n}" if n is not None else f"matchPattern: {p}"
                for n, p in self.selectors.selectors
            ],
        }


def _zombie(now: float) -> Any:
    from services.dnsproxy.cache import Zombie

    return Zombie(now, ())


def _consume(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
