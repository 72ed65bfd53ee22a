"""HTTP rules on real packets, through the node's L7 proxy to nginx (Debian's) in a pod: regex
semantics, headers and hosts on keep-alive connections, policy changes on open connections,
headerMatches actions, egress rules to an outside server, and HTTP/1.1 as clients really send it."""

from __future__ import annotations

import json
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import VENV_BIN, Internet, L7Proxy, Node, eventually
from support.servers import find_binary

PY = str(VENV_BIN / "python")

NGINX_CONF = """
user root;
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 512; }}
http {{
  log_format upstream '$request_method $request_uri $status $request_length token=$http_x_token';
  access_log {dir}/access.log upstream;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  client_max_body_size 0;
  keepalive_requests 100000;
  server {{
    listen {port};
    location /upload/ {{
      root {dir}/www;
      dav_methods PUT;
      create_full_put_path on;
    }}
    location / {{
      return 200 "$request_method $request_uri token=[$http_x_token] added=[$http_x_added] agent=[$http_user_agent]\\n";
    }}
  }}
}}
"""


@dataclass
class Web:
    """A `web` pod serving nginx on :80, a `client` and an `other` pod, on a node with its L7 proxy."""

    node: Node
    proxy: L7Proxy
    dir: Path

    @property
    def ip(self) -> str:
        return self.node.ip("default/web")

    def allow(self, http: list[dict[str, Any]], name: str = "web-l7", port: int = 80, **peer: Any) -> None:
        """Ingress to web:`port` from app=client (or `peer`), with these HTTP rules."""
        spec = {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name},
            "spec": {
                "endpointSelector": {"matchLabels": {"app": "web"}},
                "ingress": [
                    {
                        "fromEndpoints": [peer.get("from", {"matchLabels": {"app": "client"}})],
                        "toPorts": [
                            {"ports": [{"port": str(port), "protocol": "TCP"}], "rules": {"http": http}}
                        ],
                    }
                ],
            },
        }
        self.node.apply(yaml.safe_dump(spec))

    def curl(self, *args: str, pod: str = "default/client", timeout: float = 3.0) -> tuple[int, bytes]:
        done = subprocess.run(
            self.node.argv(pod, "curl", "-s", "-m", str(timeout), *args),
            capture_output=True,
            timeout=timeout + 10,
        )
        return done.returncode, done.stdout

    def get(self, path: str, *args: str, **kw: Any) -> bytes:
        return self.curl(*args, f"http://{self.ip}{path}", **kw)[1]

    def access_log(self) -> list[str]:
        log = self.dir / "access.log"
        return log.read_text().splitlines() if log.exists() else []

    def python(self, script: str, *args: str, pod: str = "default/client", timeout: float = 60) -> Any:
        """Run a Python script in a pod; it prints one JSON document."""
        done = self.node.exec(pod, PY, "-c", textwrap.dedent(script), *args, timeout=timeout)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


def serve_web(node: Node, proxy: L7Proxy, tmp_path: Path) -> Web:
    """Pods web (nginx on :80), client and other on `node`."""
    node.add("web", {"app": "web"})
    node.add("client", {"app": "client"})
    node.add("other", {"app": "other"})
    d = tmp_path / "nginx"
    d.mkdir()
    (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, port=80))
    nginx = find_binary("nginx")
    node.spawn("default/web", nginx, "-e", str(d / "error.log"), "-p", str(d), "-c", str(d / "nginx.conf"))
    eventually(lambda: ":80 " in node.exec("default/web", "ss", "-ltnH").stdout, what="nginx listening")
    return Web(node, proxy, d)


@pytest.fixture
def web(node: Node, l7proxy: L7Proxy, tmp_path: Path) -> Web:
    return serve_web(node, l7proxy, tmp_path)


def test_path_regexes_match_the_whole_path_and_a_prefix_never_matches(web: Web) -> None:
    web.allow([{"method": "GET", "path": "/v1/.*"}, {"method": "GET", "path": "/exact"}])
    assert web.get("/v1/") == b"GET /v1/ token=[] added=[] agent=[curl/7.88.1]\n"
    assert web.get("/v1/ships/42?fuel=full").startswith(b"GET /v1/ships/42?fuel=full ")  # query included
    assert web.get("/v1") == b"Access denied\r\n"  # "/v1/.*" needs the slash
    assert web.get("/exact").startswith(b"GET /exact ")
    assert web.get("/exact/more") == b"Access denied\r\n"  # no prefix match
    assert web.get("/prefix/exact") == b"Access denied\r\n"  # anchored at the start too
    assert web.get("/v1/", "-XPOST") == b"Access denied\r\n"  # method must match as well
    assert all(" /v1 " not in line and "/exact/more" not in line for line in web.access_log())


def test_method_and_host_regexes(web: Web) -> None:
    web.allow([{"method": "GET|HEAD", "host": "(www\\.)?example\\.com(:80)?"}])
    assert web.get("/", "-H", "Host: example.com").startswith(b"GET / ")
    assert web.get("/", "-H", "Host: www.example.com:80").startswith(b"GET / ")
    assert web.curl("-I", "-H", "Host: example.com", f"http://{web.ip}/")[1].startswith(b"HTTP/1.1 200")
    assert web.get("/", "-H", "Host: example.com.evil") == b"Access denied\r\n"
    assert web.get("/", "-H", "Host: wwwXexample.com") == b"Access denied\r\n"
    assert web.get("/", "-X", "DELETE", "-H", "Host: example.com") == b"Access denied\r\n"
    assert web.get("/") == b"Access denied\r\n"  # Host is the pod's address


def test_a_required_header_gives_200_then_403_on_one_keep_alive_connection(web: Web) -> None:
    web.allow([{"method": "GET", "path": "/ships", "headers": ["X-Token: sith"]}])
    url = f"http://{web.ip}/ships"
    code, out = web.curl(
        "-H", "X-Token: sith", "-w", "|%{http_code} %{num_connects}|", url,
        "--next", "-s", "-w", "|%{http_code} %{num_connects}|", url,
    )  # fmt: skip
    assert code == 0
    parts = out.split(b"|")
    assert parts[:2] == [b"GET /ships token=[sith] added=[] agent=[curl/7.88.1]\n", b"200 1"]
    assert parts[2:4] == [b"Access denied\r\n", b"403 0"]  # num_connects 0: the same connection, kept open


def test_a_policy_change_applies_to_the_next_request_on_an_open_connection(web: Web) -> None:
    web.allow([{"method": "GET", "path": "/a"}])
    session = Session(web.node, "default/client", web.ip)
    try:
        assert session.get("/a") == (200, session.port)
        assert session.get("/b") == (403, session.port)
        web.allow([{"method": "GET", "path": "/b"}])  # replaces the rule: /b now, not /a
        assert session.get("/b") == (200, session.port)
        assert session.get("/a") == (403, session.port)
    finally:
        session.close()


class Session:
    """One HTTP/1.1 keep-alive connection from a pod; each request reports (status, local port)."""

    SCRIPT = textwrap.dedent(
        """
        import http.client, json, sys
        conn = http.client.HTTPConnection(sys.argv[1], 80, timeout=5)
        for line in sys.stdin:
            method, path = line.split()
            conn.request(method, path)
            r = conn.getresponse()
            r.read()
            print(json.dumps([r.status, conn.sock.getsockname()[1]]), flush=True)
        """
    )

    def __init__(self, node: Node, pod: str, ip: str) -> None:
        self.proc = subprocess.Popen(
            node.argv(pod, PY, "-u", "-c", self.SCRIPT, ip),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port: int | None = None

    def get(self, path: str) -> tuple[int, int | None]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"GET {path}\n")
        self.proc.stdin.flush()
        status, port = json.loads(self.proc.stdout.readline())
        if self.port is None:
            self.port = port
        return status, port

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_header_matches_mismatch_actions_edit_or_log_the_request(web: Web) -> None:
    web.allow(
        [
            {"method": "GET", "path": "/log", "headerMatches": [{"name": "X-Token", "value": "sith", "mismatch": "LOG"}]},
            {"method": "GET", "path": "/add", "headerMatches": [{"name": "X-Added", "value": "yes", "mismatch": "ADD"}]},
            {"method": "GET", "path": "/replace", "headerMatches": [{"name": "X-Token", "value": "sith", "mismatch": "REPLACE"}]},
            {"method": "GET", "path": "/delete", "headerMatches": [{"name": "X-Token", "value": "sith", "mismatch": "DELETE"}]},
            {"method": "GET", "path": "/required", "headerMatches": [{"name": "X-Token", "value": "sith"}]},
        ]
    )  # fmt: skip
    jedi = ("-H", "X-Token: jedi")
    assert web.get("/log", *jedi).startswith(b"GET /log token=[jedi] added=[]")  # logged, let through
    assert web.get("/add").startswith(b"GET /add token=[] added=[yes]")  # added when missing
    assert web.get("/replace", *jedi).startswith(b"GET /replace token=[sith]")  # the value replaced
    assert web.get("/replace").startswith(b"GET /replace token=[sith]")  # or set when missing
    assert web.get("/delete", *jedi).startswith(b"GET /delete token=[]")  # the wrong value removed
    assert web.get("/delete", "-H", "X-Token: sith").startswith(b"GET /delete token=[sith]")
    assert web.get("/required", *jedi) == b"Access denied\r\n"  # no action: a mismatch denies
    assert web.get("/required", "-H", "X-Token: sith").startswith(b"GET /required token=[sith]")


def test_an_egress_rule_lets_a_pod_only_get_public_paths_of_an_outside_server(
    node: Node, l7proxy: L7Proxy, internet: Internet
) -> None:
    outside = "203.0.113.80"
    internet.serve("http", outside, 80)
    node.add("crawler", {"app": "crawler"})
    node.apply(
        yaml.safe_dump(
            {
                "apiVersion": "cilium.io/v2",
                "kind": "CiliumNetworkPolicy",
                "metadata": {"name": "crawler-egress"},
                "spec": {
                    "endpointSelector": {"matchLabels": {"app": "crawler"}},
                    "egress": [
                        {
                            "toCIDR": [f"{outside}/32"],
                            "toPorts": [
                                {
                                    "ports": [{"port": "80", "protocol": "TCP"}],
                                    "rules": {"http": [{"method": "GET", "path": "/public/.*"}]},
                                }
                            ],
                        }
                    ],
                },
            }
        )
    )

    def get(*args: str) -> bytes:
        done = subprocess.run(
            node.argv("default/crawler", "curl", "-s", "-m", "3", *args), capture_output=True
        )
        return done.stdout

    assert get(f"http://{outside}/public/index.html") == b"deathstar /public/index.html\n"
    assert get(f"http://{outside}/private/plans") == b"Access denied\r\n"
    assert get("-XPOST", f"http://{outside}/public/index.html") == b"Access denied\r\n"
    # Other outside addresses stay closed at L3 (no redirect, no 403): curl times out.
    internet.serve("http", "203.0.113.81", 80)
    assert (
        subprocess.run(
            node.argv("default/crawler", "curl", "-s", "-m", "1", "http://203.0.113.81/public/x")
        ).returncode
        == 28
    )

    def egress_flow() -> list[dict[str, Any]]:
        return [
            f
            for f in node.flows()
            if (f.get("l7") or {}).get("type") == "REQUEST" and f.get("traffic_direction") == "EGRESS"
        ]

    flows = eventually(egress_flow, 10, "the egress HTTP flows")
    assert flows[0]["destination"]["identity"] >= 1 and flows[0]["source"]["pod_name"] == "crawler"
