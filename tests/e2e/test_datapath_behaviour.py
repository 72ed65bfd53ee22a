"""The datapath's promises on real packets: stateful replies, enforcement without the control plane,
agent restarts that cut nothing, revocation that cuts, the proxy redirect, malformed packets."""

from __future__ import annotations

import json
import select
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from conftest import VENV_BIN, Node, eventually

from services.datapath.eventtypes import DROP_CT_INVALID_HDR, DROP_INVALID_PACKET, DROP_PROXY_NOT_BOUND
from services.datapath.maps import from_proxy_mark

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PY = str(VENV_BIN / "python")

RULE1 = (EXAMPLES / "policies" / "starwars-l3-l4.yaml").read_text()
RULE1_REVOKED = RULE1.replace(
    "    - matchLabels:\n        org: empire\n", "    - matchLabels:\n        org: rebels\n"
)
assert RULE1_REVOKED != RULE1


def probe(node: Node, src: str, dst_ip: str, port: int, proto: str = "tcp", timeout: float = 1.0) -> bool:
    done = node.exec(
        src,
        PY,
        "-m",
        "cilia.demo_apps",
        f"probe-{proto}",
        "--bind",
        dst_ip,
        "--port",
        str(port),
        "--timeout",
        str(timeout),
    )
    return done.returncode == 0


class Stream:
    """A long-lived TCP connection from a pod: each line sent comes back from an echo server."""

    CLIENT = textwrap.dedent(
        """
        import socket, sys
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        s.settimeout(None)
        f = s.makefile("rw")
        print("connected", flush=True)
        for line in sys.stdin:
            f.write(line); f.flush()
            print(f.readline(), end="", flush=True)
        """
    )

    def __init__(self, node: Node, src: str, dst_ip: str, port: int) -> None:
        self.proc = subprocess.Popen(
            node.argv(src, PY, "-u", "-c", self.CLIENT, dst_ip, str(port)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.readline(5) == "connected"

    def readline(self, timeout: float) -> str | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        return self.proc.stdout.readline().strip()

    def echo(self, text: str, timeout: float = 2.0) -> bool:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.readline(timeout) == text

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def starwars(node: Node) -> Node:
    node.add("deathstar-1", {"org": "empire", "class": "deathstar"})
    node.add("tiefighter", {"org": "empire", "class": "tiefighter"})
    node.add("xwing", {"org": "alliance", "class": "xwing"})
    node.serve("default/deathstar-1", "tcp-echo", 80)
    return node


def test_bookinfo_egress_lockdown_with_tcp_and_udp_servers(node: Node) -> None:
    """Steps 1 and 3 of the BookInfo scenario: deny-all egress, then allow reviews and details."""
    import yaml

    steps = yaml.safe_load((EXAMPLES / "bookinfo.yaml").read_text())["steps"]
    for name, labels in (
        ("productpage-v1", {"app": "productpage", "version": "v1"}),
        ("reviews-v1", {"app": "reviews", "version": "v1"}),
        ("details-v1", {"app": "details", "version": "v1"}),
        ("ratings-v1", {"app": "ratings", "version": "v1"}),
    ):
        node.add(name, labels)
    for pod in ("reviews-v1", "details-v1", "ratings-v1"):
        node.serve(f"default/{pod}", "tcp-echo", 9080)
        node.serve(f"default/{pod}", "udp-echo", 9081)
    reviews, details, ratings = (node.ip(f"default/{p}") for p in ("reviews-v1", "details-v1", "ratings-v1"))
    assert probe(
        node, "default/productpage-v1", reviews, 9081, "udp"
    )  # before: open, and the UDP reply came back
    node.apply(yaml.safe_dump_all(steps[0]["apply"]))
    assert not probe(node, "default/productpage-v1", reviews, 9080)
    assert not probe(node, "default/productpage-v1", reviews, 9081, "udp")
    assert probe(node, "default/reviews-v1", ratings, 9080)  # others are untouched
    node.apply(yaml.safe_dump_all(steps[2]["apply"]))
    assert probe(node, "default/productpage-v1", reviews, 9080)
    assert probe(node, "default/productpage-v1", details, 9080)
    assert probe(node, "default/productpage-v1", reviews, 9081, "udp")  # stateful: the echo reply passes
    assert not probe(node, "default/productpage-v1", ratings, 9080)


def test_enforcement_continues_while_the_control_plane_is_down(starwars: Node) -> None:
    starwars.apply(RULE1)
    target = starwars.ip("default/deathstar-1")
    starwars.cp.identity.stop()
    starwars.policy.stop()
    starwars.cp.nats.stop()
    try:
        for _ in range(3):
            assert probe(starwars, "default/tiefighter", target, 80)
            assert not probe(starwars, "default/xwing", target, 80, timeout=0.5)
    finally:
        starwars.cp.nats.start()
        starwars.cp.identity.start()
        starwars.policy.start()
    # Back: a new policy applies within seconds (the xwing is let in too).
    started = time.monotonic()
    starwars.apply(
        textwrap.dedent(
            """
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata: {name: let-xwing-in}
            spec:
              endpointSelector: {matchLabels: {class: deathstar}}
              ingress:
              - fromEndpoints: [{matchLabels: {class: xwing}}]
            """
        )
    )
    eventually(
        lambda: probe(starwars, "default/xwing", target, 80, timeout=0.5),
        timeout=10,
        what="the new policy letting xwing in",
    )
    assert time.monotonic() - started < 15


def test_an_agent_restart_cuts_no_connection_and_keeps_enforcing(starwars: Node) -> None:
    starwars.apply(RULE1)
    target = starwars.ip("default/deathstar-1")
    stream = Stream(starwars, "default/tiefighter", target, 80)
    try:
        assert stream.echo("before")
        starwars.agent.stop()
        assert stream.echo("while-down")
        assert not probe(starwars, "default/xwing", target, 80, timeout=0.5)
        starwars.agent.start(timeout=60)
        eventually(lambda: starwars.status().get("policies_synced"), what="the agent resynced")
        assert stream.echo("after")
        assert not probe(starwars, "default/xwing", target, 80, timeout=0.5)
        assert probe(starwars, "default/tiefighter", target, 80)
    finally:
        stream.close()


def test_revoking_an_allow_cuts_an_established_flow_and_granting_opens_one(starwars: Node) -> None:
    starwars.apply(RULE1)
    target = starwars.ip("default/deathstar-1")
    stream = Stream(starwars, "default/tiefighter", target, 80)
    try:
        assert stream.echo("allowed")
        starwars.apply(RULE1_REVOKED)
        assert not stream.echo("revoked", timeout=1.5)
    finally:
        stream.close()
    started = time.monotonic()
    starwars.apply(RULE1)
    eventually(
        lambda: probe(starwars, "default/tiefighter", target, 80, timeout=0.5), timeout=5, what="the grant"
    )
    assert time.monotonic() - started < 3


PROXY = textwrap.dedent(
    """
    import json, socket, struct, sys, threading
    node, port = sys.argv[1], int(sys.argv[2])
    api = socket.socket(socket.AF_UNIX)
    api.connect(f"/run/cilia/{node}.sock")
    api.sendall(json.dumps({"op": "register_proxy", "type": "http", "port": port, "mode": "dnat"}).encode() + b"\\n")
    assert json.loads(api.makefile().readline())["ok"]
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    print("ready", flush=True)

    def serve(conn):
        od = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
        oport, oaddr = struct.unpack("!2xH4s8x", od)
        orig = f"{socket.inet_ntoa(oaddr)}:{oport}"
        f = conn.makefile("rw")
        mark, payload = f.readline().split()
        up = socket.socket()
        up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(mark))
        up.settimeout(1.5)
        try:
            up.connect((socket.inet_ntoa(oaddr), oport))
            up.sendall(payload.encode() + b"\\n")
            answer = up.makefile().readline().strip()
        except OSError:
            answer = "FAILED"
        f.write(f"orig={orig} upstream={answer}\\n")
        f.flush()

    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    """
)

CLIENT = textwrap.dedent(
    """
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    s.sendall((sys.argv[3] + " " + sys.argv[4] + "\\n").encode())
    print(s.makefile().readline().strip())
    """
)

HTTP_RULE = textwrap.dedent(
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: rule1}
    spec:
      endpointSelector: {matchLabels: {org: empire, class: deathstar}}
      ingress:
      - fromEndpoints: [{matchLabels: {org: empire}}]
        toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules:
            http: [{method: POST, path: /v1/request-landing}]
    """
)


def metric(node: Node, reason: int) -> int:
    m = node.maps()
    try:
        return sum(p for (r, _d), (p, _b) in m.metrics_totals().items() if r == reason)
    finally:
        m.close()


def test_the_proxy_redirect_reaches_the_proxy_with_the_original_destination_and_the_real_source(
    starwars: Node,
) -> None:
    starwars.apply(HTTP_RULE)
    target = starwars.ip("default/deathstar-1")
    tie = starwars.endpoint("default/tiefighter")["identity"]
    xwing = starwars.endpoint("default/xwing")["identity"]
    # No proxy bound: the redirected connection is dropped, and counted.
    before = metric(starwars, DROP_PROXY_NOT_BOUND)
    assert not probe(starwars, "default/tiefighter", target, 80, timeout=0.5)
    eventually(lambda: metric(starwars, DROP_PROXY_NOT_BOUND) > before, what="a proxy-not-bound drop counted")
    port = 15080
    proxy = subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{starwars.netns}",
            "--",
            PY,
            "-u",
            "-c",
            PROXY,
            starwars.name,
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout is not None
        assert proxy.stdout.readline().strip() == "ready", proxy.stderr.read() if proxy.stderr else ""
        eventually(lambda: str(port) in starwars.status().get("proxies", {}), what="the proxy registered")

        def via_proxy(identity: int) -> str:
            out = starwars.exec(
                "default/tiefighter",
                PY,
                "-c",
                CLIENT,
                target,
                "80",
                str(from_proxy_mark(identity, True)),
                "hello",
            )
            return out.stdout.strip()

        # The proxy sees the original destination; upstream, deathstar's ingress policy judges the
        # identity in the mark: tiefighter's is allowed ...
        assert eventually(
            lambda: via_proxy(tie) == f"orig={target}:80 upstream=hello", what="a proxied round trip"
        )
        # ... xwing's is not, although the packets come from the same proxy socket on the node.
        assert via_proxy(xwing) == f"orig={target}:80 upstream=FAILED"
    finally:
        proxy.kill()
        proxy.wait()
    # The proxy is gone: its registration went with its connection, redirects fail closed again.
    eventually(lambda: str(port) not in starwars.status().get("proxies", {}), what="the proxy unregistered")
    before = metric(starwars, DROP_PROXY_NOT_BOUND)
    assert not probe(starwars, "default/tiefighter", target, 80, timeout=0.5)
    eventually(lambda: metric(starwars, DROP_PROXY_NOT_BOUND) > before, what="a proxy-not-bound drop counted")


RAW = textwrap.dedent(
    """
    import socket, struct, sys
    src, dst, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind(("eth0", 0))
    mac = open("/sys/class/net/eth0/address").read().strip()
    eth = bytes.fromhex("ffffffffffff") + bytes.fromhex(mac.replace(":", "")) + b"\\x08\\x00"
    def ip(total, proto, payload):
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst))
        return hdr + payload
    if kind == "truncated-ip":   # claims 1000 bytes, carries 28
        frame = eth + ip(1000, 17, b"\\x00" * 8)
    else:                        # TCP with a 4-byte header
        frame = eth + ip(24, 6, b"\\x00\\x50\\x00\\x50")
    for _ in range(3):
        s.send(frame)
    """
)


def test_malformed_and_truncated_packets_are_dropped_and_counted(starwars: Node) -> None:
    src = starwars.ip("default/xwing")
    target = starwars.ip("default/deathstar-1")
    invalid, truncated = metric(starwars, DROP_INVALID_PACKET), metric(starwars, DROP_CT_INVALID_HDR)
    for kind in ("truncated-ip", "short-tcp"):
        done = starwars.exec("default/xwing", PY, "-c", RAW, src, target, kind)
        assert done.returncode == 0, done.stderr
    eventually(
        lambda: metric(starwars, DROP_INVALID_PACKET) >= invalid + 3, what="truncated IP packets counted"
    )
    eventually(
        lambda: metric(starwars, DROP_CT_INVALID_HDR) >= truncated + 3, what="short TCP headers counted"
    )
    # The agent and the datapath keep working.
    assert probe(starwars, "default/xwing", target, 80)
    status, body = starwars.api("GET", "/readyz")
    assert status == 200, body
    flows = [
        f
        for f in starwars.flows()
        if f.get("drop_reason_desc") in ("INVALID_PACKET", "CT_TRUNCATED_OR_INVALID_HEADER")
    ]
    assert flows, json.dumps(starwars.flows(5))
