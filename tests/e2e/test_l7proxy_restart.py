"""The L7 proxy dies and comes back while a client keeps sending requests: redirects fail closed
while it is gone, allowed requests resume within a second of its return, and no denied request
ever reaches the server."""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path

from conftest import VENV_BIN, L7Proxy, Node, eventually
from test_l7proxy_rules import serve_web

CLIENT_LOOP = textwrap.dedent(
    """
    import json, socket, sys, time
    ip, duration = sys.argv[1], float(sys.argv[2])
    end, i = time.time() + duration, 0
    while time.time() < end:
        path = "/allowed" if i % 2 == 0 else "/denied"
        i += 1
        t = time.time()
        try:
            s = socket.create_connection((ip, 80), timeout=0.3)
            s.settimeout(1.0)
            s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            status = int(data.split()[1]) if data.startswith(b"HTTP/1.") else "empty"
            s.close()
        except OSError as err:
            status = type(err).__name__
        print(json.dumps([t, path, status]), flush=True)
        time.sleep(0.02)
    """
)


def test_a_restarted_proxy_resumes_allowed_requests_within_a_second_and_never_lets_a_denied_one_through(
    node: Node, l7proxy: L7Proxy, tmp_path: Path
) -> None:
    web = serve_web(node, l7proxy, tmp_path)
    web.allow([{"method": "GET", "path": "/allowed"}])
    assert web.get("/allowed").startswith(b"GET /allowed ")
    loop = subprocess.Popen(
        node.argv("default/client", str(VENV_BIN / "python"), "-c", CLIENT_LOOP, web.ip, "12"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2)
        l7proxy.kill()
        killed = time.time()
        eventually(lambda: not l7proxy.registered(), 10, "the agent dropping the dead proxy's registration")
        time.sleep(1)  # the client keeps trying against the closed redirect
        restarted = time.time()
        l7proxy.start()  # returns once the agent has the new registration
        registered = time.time()
        out, _ = loop.communicate(timeout=30)
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait()
    results = [json.loads(line) for line in out.splitlines()]
    denied = [r for r in results if r[1] == "/denied"]
    allowed = [r for r in results if r[1] == "/allowed"]
    # Not once did a denied request get anything but the 403 (or no connection at all) ...
    assert denied and all(status != 200 for _, _, status in denied)
    assert not [line for line in web.access_log() if "/denied" in line]  # ... nor reach the server.
    # While the proxy was gone, the redirect failed closed: nothing got through.
    gone = [r for r in results if killed + 0.1 < r[0] < restarted]
    assert gone and all(status not in (200, 403) for _, _, status in gone)
    # Once it was back, allowed requests were answered within a second.
    back = [t for t, path, status in allowed if t >= registered and status == 200]
    assert back and back[0] - registered < 1.0
    assert [r for r in results if r[0] > registered + 1 and r[1] == "/allowed" and r[2] != 200] == []
    print(f"proxy down {restarted - killed:.1f}s, start-up {registered - restarted:.2f}s, "
          f"first allowed answer {back[0] - registered:.3f}s after registration")  # fmt: skip
