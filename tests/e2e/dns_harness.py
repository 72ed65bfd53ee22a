"""e2e support for the DNS proxy: the proxy process of a node, and a small DNS "world".

`DNSProxyProcess` runs `python -m services.dnsproxy` for a test node (data plane in the node's
namespace, state beside the agent's). `DNSWorld` builds what the pods resolve against: an
authoritative server (tests/e2e/dns_server.py, dnslib) on 198.51.100.53 in the test's "internet"
namespace, and a kube-dns pod (`kube-system/coredns`, labels `k8s-app=kube-dns`) that answers
`cluster.local` itself and forwards the rest there, as CoreDNS does. Pods resolve with `dig`
against the kube-dns pod, or through the libc resolver (curl) with a resolv.conf naming it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import Internet, Node, eventually, free_port
from support.servers import REPO, VENV_BIN, ServerProcess

PY = str(VENV_BIN / "python")
DNS_SERVER = str(Path(__file__).resolve().parent / "dns_server.py")
AUTHORITY = "198.51.100.53"
PROXY_PORT = 10053


class DNSProxyProcess:
    """The node's DNS proxy as a process a test can stop, kill and start again."""

    def __init__(self, node: Node, log_dir: Path, **env: str) -> None:
        self.node = node
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "CILIA_NATS_URL": node.cp.nats.url,
            "CILIA_TOKEN_FILE": str(node.cp.creds_file),
            "CILIA_HTTP_ADDR": f"127.0.0.1:{self.port}",
            "CILIA_NODE": node.name,
            "CILIA_NODE_NETNS": node.netns,
            "CILIA_STATE_DIR": str(node.state_dir),
            "CILIA_TOFQDNS_PROXY_PORT": str(PROXY_PORT),
            **env,
        }
        self.log_dir = log_dir
        self.process = self._process()

    def _process(self) -> ServerProcess:
        return ServerProcess(
            "cilia-dnsproxy",
            [PY, "-m", "services.dnsproxy"],
            self.url,
            self.registered,
            self.log_dir / "dnsproxy.log",
            self.env,
        )

    def get(self, path: str) -> Any:
        req = urllib.request.Request(f"{self.url}{path}")
        req.add_header("authorization", f"Bearer {self.node.token}")
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def registered(self) -> bool:
        try:
            return bool(self.get("/v1/dnsproxy/status").get("registered"))
        except (OSError, ValueError):
            return False

    def start(self, timeout: float = 60) -> None:
        self.process.start(timeout)

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        self.process.kill()

    def spawn_second(self) -> DNSProxyProcess:
        """Another proxy process for the same node (a rolling restart starts it beside the first)."""
        other = DNSProxyProcess.__new__(DNSProxyProcess)
        other.node, other.log_dir = self.node, self.log_dir
        other.port = free_port()
        other.url = f"http://127.0.0.1:{other.port}"
        other.env = {**self.env, "CILIA_HTTP_ADDR": f"127.0.0.1:{other.port}"}
        other.process = other._process()
        return other

    def cache(self, **params: str) -> list[dict[str, Any]]:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return list(self.get(f"/v1/fqdn/cache?{query}")["items"])

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a counter's samples whose labels include `labels`."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name):
                continue
            m = re.match(r"^([a-z_]+)(\{(.*)\})? ([0-9.e+-]+)$", line)
            if not m or m.group(1) not in (name, f"{name}_total"):
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(4))
        return total


@dataclass
class Dig:
    status: str
    answers: list[str]
    raw: str

    @property
    def ips(self) -> list[str]:
        return [a.split()[-1] for a in self.answers if a.split()[3] in ("A", "AAAA")]


class DNSWorld:
    """The authoritative server on the internet, the kube-dns pod, and the test's zone."""

    def __init__(self, node: Node, internet: Internet, tmp: Path) -> None:
        self.node = node
        self.internet = internet
        self.tmp = tmp
        self.zone = tmp / "zone.json"
        self.cluster_zone = tmp / "cluster-zone.json"
        self.authority_log = tmp / "authority-queries.log"
        self.coredns_log = tmp / "coredns-queries.log"
        self.records: dict[str, dict[str, Any]] = {}
        self.cluster_records: dict[str, dict[str, Any]] = {}
        self.set_zone(
            {
                "api.github.com.": {"A": ["198.51.100.10"], "ttl": 30},
                "support.github.com.": {"A": ["198.51.100.11"], "ttl": 30},
                "github.com.": {"A": ["198.51.100.12"], "ttl": 30},
                "ifconfig.me.": {"A": ["198.51.100.44"], "ttl": 30},
                "cnn.com.": {"A": ["198.51.100.5"], "ttl": 30},
            }
        )
        self.set_cluster_zone({})
        internet.address(AUTHORITY)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.procs.append(
            subprocess.Popen(
                [
                    "nsenter",
                    f"--net=/run/netns/{internet.netns}",
                    "--",
                    PY,
                    DNS_SERVER,
                    "--bind",
                    AUTHORITY,
                    "--zone",
                    str(self.zone),
                    "--log",
                    str(self.authority_log),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        internet.procs.extend(self.procs)
        self.coredns = node.add("coredns", {"k8s-app": "kube-dns"}, namespace="kube-system")
        self.coredns_ip = str(self.coredns["ip"])
        node.spawn(
            "kube-system/coredns",
            PY,
            DNS_SERVER,
            "--bind",
            self.coredns_ip,
            "--zone",
            str(self.cluster_zone),
            "--upstream",
            f"{AUTHORITY}:53",
            "--log",
            str(self.coredns_log),
        )
        eventually(
            lambda: ":53 " in node.exec("kube-system/coredns", "ss", "-H", "-lun").stdout,
            what="the kube-dns pod listening",
        )
        self.resolv = tmp / "resolv.conf"
        self.resolv.write_text(f"nameserver {self.coredns_ip}\noptions timeout:1 attempts:2\n")

    def set_zone(self, records: dict[str, dict[str, Any]]) -> None:
        self.records = records
        _write_json(
            self.zone, {"zones": ["github.com.", "ifconfig.me.", "cnn.com.", "test."], "records": records}
        )

    def set_cluster_zone(self, records: dict[str, dict[str, Any]]) -> None:
        self.cluster_records = records
        _write_json(self.cluster_zone, {"zones": ["cluster.local."], "records": records})

    def dig(
        self,
        pod: str,
        name: str,
        qtype: str = "A",
        *,
        server: str | None = None,
        tcp: bool = False,
        tries: int = 2,
        timeout: int = 1,
    ) -> Dig:
        argv = [
            "dig",
            f"@{server or self.coredns_ip}",
            name,
            qtype,
            f"+tries={tries}",
            f"+timeout={timeout}",
            "+noall",
            "+answer",
            "+comments",
        ]
        if tcp:
            argv.append("+tcp")
        out = self.node.exec(pod, *argv, timeout=tries * timeout + 10)
        m = re.search(r"status: ([A-Z]+)", out.stdout)
        status = m.group(1) if m else ("TIMEOUT" if "timed out" in out.stdout + out.stderr else "ERROR")
        answers = [
            line
            for line in out.stdout.splitlines()
            if line and not line.startswith(";") and len(line.split()) >= 5
        ]
        return Dig(status, answers, out.stdout + out.stderr)

    def curl(self, pod: str, url: str, timeout: float = 3) -> subprocess.CompletedProcess[str]:
        """curl in the pod, resolving through the libc resolver against the kube-dns pod (its own
        resolv.conf, bind-mounted in a private mount namespace, as a pod has)."""
        script = f"mount --bind {self.resolv} /etc/resolv.conf && exec curl -sS -m {timeout} -o /dev/null -w '%{{http_code}}' {url}"
        return self.node.exec(pod, "unshare", "-m", "sh", "-c", script, timeout=timeout + 10)

    def queries(self, log: Path) -> list[tuple[str, str, str]]:
        if not log.exists():
            return []
        return [tuple(line.split()) for line in log.read_text().splitlines() if line.strip()]  # type: ignore[misc]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()


def _write_json(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    # A second write in the same mtime tick would go unnoticed by the server: bump it explicitly.
    now = time.time()
    os.utime(path, (now, now))


def reach(node: Node, pod: str, ip: str, port: int, timeout: float = 0.7) -> bool:
    """A TCP connection from the pod opens (the policy let the SYN through and the server answered)."""
    argv = [
        PY,
        "-m",
        "cilia.demo_apps",
        "probe-tcp",
        "--bind",
        ip,
        "--port",
        str(port),
        "--timeout",
        str(timeout),
    ]
    return node.exec(pod, *argv).returncode == 0
