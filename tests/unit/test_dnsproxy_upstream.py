"""The DNS proxy's shared upstream sockets (services/dnsproxy/upstream.py), against a real UDP DNS
server on loopback (dnslib answers, in a thread): concurrent queries of one identity share a
socket and each gets its own answer, however the server orders them; a socket is replaced after
`rotate` seconds and the retired one closes once its queries are answered."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from dnslib import RR, A, DNSRecord

from services.dnsproxy import wire
from services.dnsproxy.upstream import UpstreamPool


class ReversingServer:
    """Answers `<n>.test` with 10.0.0.<n>; holds each batch of `batch` queries and answers them in
    reverse order (answers do not come back in the order asked)."""

    def __init__(self, batch: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.addr = self.sock.getsockname()
        self.batch = batch
        self.sources: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        held: list[tuple[bytes, tuple[str, int]]] = []
        while not self.stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            self.sources.add(peer[1])
            held.append((data, peer))
            if len(held) < self.batch:
                continue
            for data, peer in reversed(held):
                q = DNSRecord.parse(data)
                n = str(q.q.qname).split(".")[0]
                reply = q.reply()
                reply.add_answer(RR(q.q.qname, rdata=A(f"10.0.0.{n}"), ttl=30))
                self.sock.sendto(reply.pack(), peer)
            held.clear()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def query(n: int) -> wire.Query:
    return wire.parse_query(DNSRecord.question(f"{n}.test").pack())


def test_queries_share_a_socket_and_each_gets_its_own_answer() -> None:
    server = ReversingServer(batch=5)
    pool = UpstreamPool(lambda _reason: None, rotate=60)

    async def main() -> list[str]:
        answers = await asyncio.gather(*(pool.ask(query(n), server.addr, 0, 2.0) for n in range(1, 6)))
        return [str(DNSRecord.parse(raw).a.rdata) for raw, _msg in answers]

    try:
        assert asyncio.run(main()) == [f"10.0.0.{n}" for n in range(1, 6)]
        assert len(server.sources) == 1  # one source port: one conntrack entry, not five
    finally:
        pool.close()
        server.close()


def test_a_socket_is_replaced_after_rotate_seconds_and_the_old_one_closes_when_done() -> None:
    server = ReversingServer(batch=1)
    pool = UpstreamPool(lambda _reason: None, rotate=0.05)

    async def main() -> None:
        await pool.ask(query(1), server.addr, 0, 2.0)
        first = pool.sockets[(server.addr, 0)]
        await asyncio.sleep(0.1)
        raw, _msg = await pool.ask(query(2), server.addr, 0, 2.0)
        assert str(DNSRecord.parse(raw).a.rdata) == "10.0.0.2"
        assert pool.sockets[(server.addr, 0)] is not first and first.sock is None  # retired, closed

    try:
        asyncio.run(main())
        assert len(server.sources) == 2  # a fresh source port after the rotation
    finally:
        pool.close()
        server.close()


def test_no_answer_times_out_and_leaves_nothing_waiting() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    pool = UpstreamPool(lambda _reason: None)

    async def main() -> None:
        started = time.monotonic()
        try:
            await pool.ask(query(1), silent.getsockname(), 0, 0.2)
        except TimeoutError:
            pass
        else:
            raise AssertionError("an answer from a server that never answers")
        assert 0.15 < time.monotonic() - started < 1.0
        assert not pool.sockets[(silent.getsockname(), 0)].pending

    try:
        asyncio.run(main())
    finally:
        pool.close()
        silent.close()
