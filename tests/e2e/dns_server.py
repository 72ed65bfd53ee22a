"""A small DNS server for the tests (dnslib): authoritative for a JSON zone, optionally forwarding.

    python dns_server.py --bind 198.51.100.53 --zone zone.json [--upstream 198.51.100.53:53]
                         [--log queries.log]

The zone file maps names to records and is read again whenever it changes, so a test can change
an answer or its TTL while the server runs:
    {"zones": ["github.com.", "cluster.local."],
     "records": {"api.github.com.": {"A": ["198.51.100.10"], "ttl": 30},
                 "www.github.com.": {"CNAME": "api.github.com.", "ttl": 60}}}
A name inside a listed zone that has no records is NXDOMAIN; a name outside them is forwarded to
`--upstream` (as CoreDNS forwards) or, without one, NXDOMAIN. Every query received is appended to
`--log` as `client_ip name qtype`, so a test can check what reached the server. UDP and TCP.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: Path, upstream: tuple[str, int] | None, log: Path | None) -> None:
        self.zone_path = zone
        self.upstream = upstream
        self.log_path = log
        self.lock = threading.Lock()
        self.mtime = 0.0
        self.zone: dict[str, Any] = {}

    def _zone(self) -> dict[str, Any]:
        with self.lock:
            try:
                mtime = os.stat(self.zone_path).st_mtime
                if mtime != self.mtime:
                    self.zone = json.loads(self.zone_path.read_text())
                    self.mtime = mtime
            except (OSError, ValueError):
                pass
            return self.zone

    def _log(self, handler: Any, request: DNSRecord) -> None:
        if self.log_path is None:
            return
        line = f"{handler.client_address[0]} {str(request.q.qname).lower()} {QTYPE[request.q.qtype]}\n"
        with self.lock, self.log_path.open("a") as fh:
            fh.write(line)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        self._log(handler, request)
        zone = self._zone()
        records: dict[str, Any] = zone.get("records", {})
        qname = str(request.q.qname).lower()
        qtype = request.q.qtype
        reply = request.reply()
        name = qname
        for _ in range(8):  # follow CNAMEs inside the zone
            rec = records.get(name)
            if rec is None:
                break
            ttl = int(rec.get("ttl", 30))
            if "CNAME" in rec and qtype != QTYPE.CNAME:
                reply.add_answer(RR(name, QTYPE.CNAME, ttl=ttl, rdata=CNAME(rec["CNAME"])))
                name = str(rec["CNAME"]).lower()
                continue
            if qtype == QTYPE.A:
                for ip in rec.get("A", []):
                    reply.add_answer(RR(name, QTYPE.A, ttl=ttl, rdata=A(ip)))
            elif qtype == QTYPE.AAAA:
                for ip in rec.get("AAAA", []):
                    reply.add_answer(RR(name, QTYPE.AAAA, ttl=ttl, rdata=AAAA(ip)))
            return reply
        if reply.rr:
            return reply
        if any(qname == z or qname.endswith("." + z) for z in zone.get("zones", [])):
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if self.upstream is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        try:
            answer = request.send(self.upstream[0], self.upstream[1], timeout=2)
            return DNSRecord.parse(answer)
        except (OSError, ValueError):
            reply.header.rcode = RCODE.SERVFAIL
            return reply


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", required=True)
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--zone", type=Path, required=True)
    parser.add_argument("--upstream", default=None)
    parser.add_argument("--log", type=Path, default=None)
    args = parser.parse_args()
    upstream = None
    if args.upstream:
        host, _, port = args.upstream.rpartition(":")
        upstream = (host, int(port))
    resolver = ZoneResolver(args.zone, upstream, args.log)
    quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    servers = [
        DNSServer(resolver, address=args.bind, port=args.port, logger=quiet),
        DNSServer(resolver, address=args.bind, port=args.port, tcp=True, logger=quiet),
    ]
    for s in servers:
        s.start_thread()
    print("ready", flush=True)
    try:
        while all(s.isAlive() for s in servers):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(5)
    sys.exit(main())
