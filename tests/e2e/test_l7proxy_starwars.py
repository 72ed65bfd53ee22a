"""The Star Wars L7 step on real packets: curl from the pods' namespaces, through the datapath's
redirect and the node's L7 proxy, to the deathstar's HTTP server; the flows Hubble would show."""

from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import VENV_BIN, L7Proxy, Node, eventually

from cilia.flows import Flow, format_line

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RULE1_L7 = (EXAMPLES / "policies" / "starwars-l7.yaml").read_text()
SERVICE_HOST = "deathstar.default.svc.cluster.local"


def curl(node: Node, pod: str, *args: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """(curl's exit code, what it printed: bytes, so `\\r\\n` stays as sent)."""
    done = subprocess.run(
        node.argv(pod, "curl", "-s", "-m", str(timeout), *args), capture_output=True, timeout=timeout + 10
    )
    return done.returncode, done.stdout


def cilia(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CILIA_DATAPATH_URL": node.agent.url,
        "CILIA_POLICY_URL": node.policy.url,
        "CILIA_TOKEN_FILE": str(node.cp.creds_file),
        "CILIA_NATS_URL": node.cp.nats.url,
        "CILIA_NODE": node.name,
    }
    return subprocess.run(
        [str(VENV_BIN / "cilia"), *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.fixture
def starwars(node: Node, l7proxy: L7Proxy) -> Node:
    node.add("deathstar-1", {"org": "empire", "class": "deathstar"})
    node.add("tiefighter", {"org": "empire", "class": "tiefighter"})
    node.add("xwing", {"org": "alliance", "class": "xwing"})
    node.serve("default/deathstar-1", "http", 80)
    node.apply(RULE1_L7)
    return node


def test_tiefighter_lands_but_the_exhaust_port_is_access_denied(starwars: Node, l7proxy: L7Proxy) -> None:
    ds = starwars.ip("default/deathstar-1")
    landing = f"http://{ds}/v1/request-landing"
    assert curl(starwars, "default/tiefighter", "-XPOST", landing) == (0, b"Ship landed\n")
    code, out = curl(starwars, "default/tiefighter", "-i", "-XPUT", f"http://{ds}/v1/exhaust-port")
    head, _, body = out.partition(b"\r\n\r\n")
    assert code == 0 and head.startswith(b"HTTP/1.1 403 ")
    assert body == b"Access denied\r\n"  # 15 bytes, as Cilium's Envoy answers
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    assert headers[b"content-type"] == b"text/plain" and headers[b"content-length"] == b"15"
    # The path must match whole: a longer path is not the landing request.
    assert curl(starwars, "default/tiefighter", "-XPOST", f"{landing}/extra") == (0, b"Access denied\r\n")
    # The xwing never reaches the proxy: L3/L4 drops its SYN, curl times out (exit 28), no 403.
    assert curl(starwars, "default/xwing", "-XPOST", landing, timeout=2) == (28, b"")
    assert l7proxy.metric("cilia_l7proxy_requests_total", verdict="denied") == 2
    assert l7proxy.metric("cilia_l7proxy_requests_total", verdict="forwarded") == 1


def test_rule1_from_endpoints_admits_tiefighter_through_the_proxy_by_its_identity(starwars: Node) -> None:
    """The proxy's upstream connection leaves from the node's address, yet the deathstar's ingress
    policy judges it as tiefighter (the mark), not as `host`."""
    ds = starwars.ip("default/deathstar-1")
    tie = starwars.endpoint("default/tiefighter")["identity"]
    assert (
        curl(starwars, "default/tiefighter", "-XPOST", f"http://{ds}/v1/request-landing")[1]
        == b"Ship landed\n"
    )

    def upstream_verdict() -> list[Flow]:
        flows = [Flow.model_validate(f) for f in starwars.flows()]
        return [
            f
            for f in flows
            if f.event_type is not None
            and f.event_type.type == 5  # policy verdict
            and f.IP is not None
            and f.IP.source == "10.99.0.1"  # the node: the proxy's side of the upstream connection
            and f.destination is not None
            and f.destination.pod_name == "deathstar-1"
        ]

    verdict = eventually(upstream_verdict, 10, "the upstream connection's policy verdict")[0]
    assert verdict.source is not None and verdict.source.identity == tie
    assert verdict.verdict == "FORWARDED" and verdict.policy is not None
    assert verdict.policy.reason == "default/rule1 ingress[0]"


LINE = re.compile(
    r"^\w{3} [ \d]\d \d\d:\d\d:\d\d\.\d{3}: default/tiefighter:(\d+) \(ID:(\d+)\) (->|<-) "
    r"default/deathstar-1:80 \(ID:(\d+)\) (.*)$"
)


def test_every_request_is_a_request_and_a_response_flow_as_hubble_shows_them(
    starwars: Node, l7proxy: L7Proxy
) -> None:
    ds = starwars.ip("default/deathstar-1")
    tie, star = (starwars.endpoint(f"default/{p}")["identity"] for p in ("tiefighter", "deathstar-1"))
    host = ["-H", f"Host: {SERVICE_HOST}"]
    since = ["--since", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")]  # this test's flows only
    curl(starwars, "default/tiefighter", *host, "-XPOST", f"http://{ds}/v1/request-landing")
    curl(starwars, "default/tiefighter", *host, "-XPUT", f"http://{ds}/v1/exhaust-port")

    def http_lines() -> list[str]:
        out = cilia(starwars, "observe", *since, "--pod", "deathstar", "--protocol", "http")
        lines = out.stdout.splitlines()
        return lines if len(lines) == 4 else []

    lines = eventually(http_lines, 15, "four HTTP flows in cilia observe")
    url = f"http://{SERVICE_HOST}"
    want = [
        ("->", f"http-request FORWARDED (HTTP/1.1 POST {url}/v1/request-landing)"),
        ("<-", rf"http-response FORWARDED \(HTTP/1.1 200 \d+ms \(POST {url}/v1/request-landing\)\)"),
        ("->", f"http-request DROPPED (HTTP/1.1 PUT {url}/v1/exhaust-port)"),
        ("<-", f"http-response FORWARDED (HTTP/1.1 403 0ms (PUT {url}/v1/exhaust-port))"),
    ]
    ports = []
    for line, (arrow, rest) in zip(lines, want, strict=True):
        m = LINE.match(line)
        assert m is not None, line
        ports.append(m.group(1))
        assert (int(m.group(2)), m.group(3), int(m.group(4))) == (tie, arrow, star), line
        assert m.group(5) == rest or re.fullmatch(rest, m.group(5)), line
    assert ports[0] == ports[1] and ports[2] == ports[3]  # request and response: one connection
    dropped = cilia(starwars, "observe", *since, "--pod", "deathstar", "--verdict", "DROPPED")
    assert f"http-request DROPPED (HTTP/1.1 PUT {url}/v1/exhaust-port)" in dropped.stdout
    as_json = cilia(
        starwars, "observe", "--last", "500", "--protocol", "http", "--verdict", "DROPPED", "-o", "json"
    )
    flow = json.loads(as_json.stdout.splitlines()[-1])["flow"]
    assert (
        flow["Type"] == "L7"
        and flow["event_type"] == {"type": 129}
        and flow["traffic_direction"] == "INGRESS"
    )
    assert flow["l7"]["type"] == "REQUEST" and flow["is_reply"] is False
    assert flow["l7"]["http"]["method"] == "PUT" and flow["l7"]["http"]["url"] == f"{url}/v1/exhaust-port"
    assert {"key": "Host", "value": SERVICE_HOST} in flow["l7"]["http"]["headers"]
    assert flow["policy"]["reason"].startswith("http: no rule matches (default/rule1 ingress[0])")
    # Prometheus: per status code, and the latency histogram.
    assert l7proxy.metric("cilia_l7proxy_responses_total", code="200") == 1
    assert l7proxy.metric("cilia_l7proxy_responses_total", code="403") == 1
    assert l7proxy.metric("cilia_l7proxy_request_duration_seconds_count") == 2
    assert format_line(Flow.model_validate(flow)).endswith(
        f"http-request DROPPED (HTTP/1.1 PUT {url}/v1/exhaust-port)"
    )
