"""HTTP as clients really send it, through the node's L7 proxy on real packets: pipelining, chunked
and large bodies (streamed, bounded memory), early answers to denied uploads, WebSocket, h2c, and
bad input (malformed requests, oversized heads, slowloris) that must not hurt anyone else."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import VENV_BIN, L7Proxy, Node, eventually
from test_l7proxy_rules import Web, serve_web

PY = str(VENV_BIN / "python")
MIB = 1024 * 1024


@pytest.fixture
def l7proxy_settings() -> dict[str, str]:
    return {"headers_timeout": "1.5", "idle_timeout": "3"}


@pytest.fixture
def web(node: Node, l7proxy: L7Proxy, tmp_path: Path) -> Web:
    return serve_web(node, l7proxy, tmp_path)


def test_pipelined_requests_are_each_judged_and_answered_in_order(web: Web) -> None:
    web.allow([{"method": "GET|POST", "path": "/a"}])
    statuses = web.python(
        """
        import json, re, socket, sys
        s = socket.create_connection((sys.argv[1], 80), timeout=5)
        s.sendall(
            b"GET /a HTTP/1.1\\r\\nHost: w\\r\\n\\r\\n"
            b"GET /b HTTP/1.1\\r\\nHost: w\\r\\n\\r\\n"
            b"POST /a HTTP/1.1\\r\\nHost: w\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n5\\r\\nhello\\r\\n0\\r\\n\\r\\n"
            b"POST /b HTTP/1.1\\r\\nHost: w\\r\\nContent-Length: 4\\r\\n\\r\\nbody"
            b"GET /a HTTP/1.1\\r\\nHost: w\\r\\nConnection: close\\r\\n\\r\\n"
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        print(json.dumps([int(code) for code in re.findall(rb"HTTP/1\\.1 (\\d{3}) ", data)]))
        """,
        web.ip,
    )
    assert statuses == [200, 403, 200, 403, 200]
    assert [line.split()[:3] for line in web.access_log()] == [
        ["GET", "/a", "200"],
        ["POST", "/a", "200"],
        ["GET", "/a", "200"],
    ]


def test_large_uploads_stream_through_with_bounded_memory(web: Web, tmp_path: Path) -> None:
    web.allow([{"method": "PUT", "path": "/upload/.*"}])
    big = tmp_path / "plans.bin"
    with big.open("wb") as f:
        f.truncate(150 * MIB)
    stored = web.dir / "www" / "upload"
    assert web.curl("-T", "-", f"http://{web.ip}/upload/warm-up")[0] == 0
    before = web.proxy.rss_kib()
    # 150 MiB with a Content-Length, then 200 MiB chunked (curl reads it from a pipe).
    code, out = web.curl(
        "-T", str(big), "-w", "%{http_code}", f"http://{web.ip}/upload/plans.bin", timeout=60
    )
    assert (code, out) == (0, b"201")
    piped = subprocess.run(
        web.node.argv(
            "default/client",
            "bash",
            "-c",
            f"head -c {200 * MIB} /dev/zero | curl -s -m 60 -T - -w '%{{http_code}}' http://{web.ip}/upload/piped.bin",
        ),
        capture_output=True,
        timeout=90,
    )
    assert piped.stdout == b"201"
    grown_mib = (web.proxy.rss_kib() - before) / 1024
    assert grown_mib < 64, f"the proxy grew by {grown_mib:.0f} MiB for 350 MiB of uploads"
    assert (stored / "plans.bin").stat().st_size == 150 * MIB  # all of it reached the server
    assert (stored / "piped.bin").stat().st_size == 200 * MIB


def test_a_denied_upload_is_answered_at_once_and_the_connection_stays_usable(
    web: Web, tmp_path: Path
) -> None:
    web.allow([{"method": "PUT", "path": "/upload/.*"}, {"method": "GET", "path": "/a"}])
    big = tmp_path / "plans.bin"
    with big.open("wb") as f:
        f.truncate(100 * MIB)
    # curl asks `Expect: 100-continue`: the 403 comes first, so the 100 MiB are never sent.
    code, out = web.curl(
        "-T", str(big), "-w", "|%{http_code} %{size_upload}", f"http://{web.ip}/secret", timeout=20
    )
    body, _, stats = out.rpartition(b"|")
    status, sent = stats.split()
    assert (code, body, status) == (0, b"Access denied\r\n", b"403") and int(sent) < MIB
    # Without Expect, the body follows the head: the 403 comes before the body is through, the
    # rest is read and dropped, and the next request on the same connection is served.
    got = web.python(
        """
        import json, socket, sys
        s = socket.create_connection((sys.argv[1], 80), timeout=10)
        f = s.makefile("rb")

        def response():
            status = f.readline().decode().strip()
            length = 0
            while (line := f.readline()) not in (b"\\r\\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            return status, f.read(length).decode()

        s.sendall(b"PUT /secret HTTP/1.1\\r\\nHost: w\\r\\nContent-Length: %d\\r\\n\\r\\n" % (8 << 20))
        first = response()  # the answer, before a byte of the body
        for _ in range(8):
            s.sendall(b"x" * (1 << 20))
        s.sendall(b"GET /a HTTP/1.1\\r\\nHost: w\\r\\n\\r\\n")
        second = response()
        print(json.dumps([first[0], first[1], second[0]]))
        """,
        web.ip,
    )
    assert got == ["HTTP/1.1 403 Forbidden", "Access denied\r\n", "HTTP/1.1 200 OK"]
    assert not [line for line in web.access_log() if "/secret" in line]  # nothing of it went upstream


WS_SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Message, Request, TextMessage

    def serve(c):
        ws = WSConnection(ConnectionType.SERVER)
        while data := c.recv(65536):
            ws.receive_data(data)
            for ev in ws.events():
                if isinstance(ev, Request):
                    c.sendall(ws.send(AcceptConnection()))
                elif isinstance(ev, TextMessage):
                    c.sendall(ws.send(Message(data="echo " + ev.data)))
                elif isinstance(ev, CloseConnection):
                    c.sendall(ws.send(ev.response()))
                    c.close()
                    return

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 8080))
    srv.listen(16)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    """
)

WS_CLIENT = """
    import json, socket, sys
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Message, RejectConnection, RejectData, Request, TextMessage
    ws = WSConnection(ConnectionType.CLIENT)
    s = socket.create_connection((sys.argv[1], 8080), timeout=5)
    s.sendall(ws.send(Request(host="web", target=sys.argv[2])))
    out = {"status": None, "echo": None}
    while out["echo"] is None:
        data = s.recv(65536)
        if not data:
            break
        ws.receive_data(data)
        for ev in ws.events():
            if isinstance(ev, AcceptConnection):
                out["status"] = 101
                s.sendall(ws.send(Message(data="hello")))
            elif isinstance(ev, RejectConnection):
                out["status"] = ev.status_code
            elif isinstance(ev, RejectData):
                body = out.get("body", "") + ev.data.decode()
                out["body"] = body
                if ev.body_finished:
                    out["echo"] = out.pop("body")
            elif isinstance(ev, TextMessage):
                out["echo"] = ev.data
    print(json.dumps(out))
"""


def test_websocket_upgrades_work_on_allowed_paths_only(web: Web) -> None:
    web.node.spawn("default/web", PY, "-c", WS_SERVER)
    eventually(
        lambda: ":8080 " in web.node.exec("default/web", "ss", "-ltnH").stdout, what="the WebSocket server"
    )
    web.allow([{"method": "GET", "path": "/chat"}], port=8080)
    assert web.python(WS_CLIENT, web.ip, "/chat") == {"status": 101, "echo": "echo hello"}
    assert web.python(WS_CLIENT, web.ip, "/admin") == {"status": 403, "echo": "Access denied\r\n"}


def test_h2c_requests_are_judged_like_http1(web: Web) -> None:
    web.allow([{"method": "GET", "path": "/a"}])
    # HTTP/2 with prior knowledge: the proxy speaks HTTP/2 to the client, HTTP/1.1 upstream.
    code, out = web.curl(
        "--http2-prior-knowledge", "-w", "|%{http_version} %{http_code}", f"http://{web.ip}/a"
    )
    assert (code, out) == (0, b"GET /a token=[] added=[] agent=[curl/7.88.1]\n|2 200")
    code, out = web.curl(
        "--http2-prior-knowledge", "-w", "|%{http_version} %{http_code}", f"http://{web.ip}/b"
    )
    assert (code, out) == (0, b"Access denied\r\n|2 403")
    # An HTTP/1.1 request asking to upgrade to h2c stays HTTP/1.1 (and stays inspected).
    code, out = web.curl("--http2", "-w", "|%{http_version} %{http_code}", f"http://{web.ip}/a")
    assert (code, out.split(b"|")[-1]) == (0, b"1.1 200")


BAD_INPUT = """
    import json, socket, sys, time
    ip = sys.argv[1]

    def exchange(payload, wait=6.0):
        s = socket.create_connection((ip, 80), timeout=wait)
        s.sendall(payload)
        data, t0 = b"", time.monotonic()
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (socket.timeout, ConnectionResetError):
            if not data:
                return ["open", "", round(time.monotonic() - t0, 1)]
        return ["closed", data.split(b"\\r\\n")[0].decode(errors="replace"), round(time.monotonic() - t0, 1)]

    def slowloris():
        s = socket.create_connection((ip, 80), timeout=10)
        s.sendall(b"GET /a HTTP/1.1\\r\\n")
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 8:
                s.sendall(b"X-Slow: y\\r\\n")
                time.sleep(0.3)
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        break
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return round(time.monotonic() - t0, 1)

    def idle():
        s = socket.create_connection((ip, 80), timeout=10)
        s.sendall(b"GET /a HTTP/1.1\\r\\nHost: w\\r\\n\\r\\n")
        first = s.recv(65536)
        t0 = time.monotonic()
        try:
            while s.recv(65536):
                pass
        except (socket.timeout, ConnectionResetError):
            pass
        return [first.split(b"\\r\\n")[0].decode(), round(time.monotonic() - t0, 1)]

    held = []
    for _ in range(100):  # many partial heads under the size limit: memory stays bounded
        h = socket.create_connection((ip, 80), timeout=5)
        h.sendall(b"GET /a HTTP/1.1\\r\\nX-Pad: " + b"p" * 50_000)
        held.append(h)
    print(json.dumps({
        "bad_line": exchange(b"GARBAGE\\r\\n\\r\\n"),
        "huge_head": exchange(b"GET /a HTTP/1.1\\r\\nHost: w\\r\\nX-Big: " + b"a" * 100_000 + b"\\r\\n\\r\\n"),
        "bad_chunk": exchange(b"POST /a HTTP/1.1\\r\\nHost: w\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\nZZZ\\r\\n\\r\\n"),
        "smuggling": exchange(b"POST /a HTTP/1.1\\r\\nHost: w\\r\\nContent-Length: 5\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\n"),
        "not_http": exchange(b"\\x16\\x03\\x01\\x00\\xa5\\x01\\x00\\x00\\xa1\\x03\\x03" + bytes(range(64))),
        "slowloris_closed_after": slowloris(),
        "idle": idle(),
    }))
"""


def test_bad_input_gets_a_4xx_or_a_closed_connection_and_everyone_else_is_served(
    web: Web, l7proxy: L7Proxy
) -> None:
    web.allow([{"method": "GET|POST", "path": "/a"}])
    before = l7proxy.rss_kib()
    got = web.python(BAD_INPUT, web.ip)
    assert got["bad_line"][:2] == ["closed", "HTTP/1.1 400 Bad Request"]
    assert got["huge_head"][:2] == ["closed", "HTTP/1.1 431 Request Header Fields Too Large"]
    assert got["bad_chunk"][0] == "closed"
    assert got["smuggling"][:2] == ["closed", "HTTP/1.1 400 Bad Request"]
    assert got["not_http"][0] == "closed" and got["not_http"][2] < 5  # no CRLF ever: the head times out
    assert got["slowloris_closed_after"] < 5  # headers_timeout 1.5 s, swept every 0.5 s
    assert got["idle"][0] == "HTTP/1.1 200 OK" and got["idle"][1] < 6  # idle_timeout 3 s
    assert l7proxy.metric("cilia_l7proxy_connections_closed_total", reason="headers-timeout") >= 100
    assert l7proxy.metric("cilia_l7proxy_connections_closed_total", reason="idle") >= 1
    assert (l7proxy.rss_kib() - before) / 1024 < 64
    assert web.get("/a").startswith(b"GET /a ")  # and the proxy serves everyone else as before
    assert not [line for line in web.access_log() if "ZZZ" in line or line.startswith("GARBAGE")]
    # (the timings above are bounds on what the deadlines allow, not performance)
