"""Tiny workloads for the demo and the end-to-end tests: the Death Star's landing service, and TCP/UDP
echo servers. Run inside an endpoint:  cilia endpoint exec default/deathstar-1 -- python3 -m cilia.demo_apps http --port 80
"""

from __future__ import annotations

import argparse
import socketserver
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Landing(BaseHTTPRequestHandler):
    """`POST /v1/request-landing` -> `Ship landed`; `PUT /v1/exhaust-port` -> a panic; else 404."""

    server_version = "deathstar/1.0"

    def _send(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def do_POST(self) -> None:
        self._read_body()
        if self.path == "/v1/request-landing":
            self._send(200, "Ship landed\n")
        else:
            self._send(404, "Not found\n")

    def do_PUT(self) -> None:
        self._read_body()
        if self.path == "/v1/exhaust-port":
            self._send(503, "Panic: deathstar exploded\n")
        else:
            self._send(404, "Not found\n")

    def do_GET(self) -> None:
        self._send(200, f"{getattr(self.server, 'app_name', 'deathstar')} {self.path}\n")

    def log_message(self, format: str, *args: object) -> None:  # quiet
        return


class TCPEcho(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while line := self.rfile.readline():
            self.wfile.write(line)
            self.wfile.flush()


class UDPEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


class ThreadingTCP(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def probe(proto: str, host: str, port: int, timeout: float) -> int:
    """Exit 0 when a TCP connection opens (or a UDP echo answers) within `timeout` seconds, else 1."""
    import socket

    try:
        if proto == "tcp":
            with socket.create_connection((host, port), timeout=timeout):
                return 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.sendto(b"probe\n", (host, port))
            data, _ = sock.recvfrom(2048)
            return 0 if data == b"probe\n" else 1
    except OSError:
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="demo workloads")
    parser.add_argument("kind", choices=["http", "tcp-echo", "udp-echo", "probe-tcp", "probe-udp"])
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--bind", default="0.0.0.0", help="listen address, or the target of a probe")
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--name", default="deathstar", help="what the http server calls itself on GET")
    args = parser.parse_args(argv)
    if args.kind.startswith("probe-"):
        return probe(args.kind.removeprefix("probe-"), args.bind, args.port, args.timeout)
    if args.kind == "http":
        ThreadingHTTPServer.allow_reuse_address = True
        server = ThreadingHTTPServer((args.bind, args.port), Landing)
        server.app_name = args.name  # type: ignore[attr-defined]
        server.serve_forever()
    elif args.kind == "tcp-echo":
        ThreadingTCP((args.bind, args.port), TCPEcho).serve_forever()
    else:
        socketserver.ThreadingUDPServer((args.bind, args.port), UDPEcho).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
