"""A whole cilia cluster for e2e tests: `cilia.cluster.LocalCluster` (the code behind `cilia cluster up`)
with a unique name, underlay and state directory per use, removed after it even when the test fails.

`ClusterHarness` gives tests the same verbs as the single-node `Node`: add endpoints on a given node,
exec in them, apply policies and wait until *every* node enforces them, read flows and maps.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from conftest import VENV_BIN, eventually, serve_in_netns
from support.servers import REPO

from cilia import auth
from cilia.cluster import ClusterState, LocalCluster
from services.datapath import maps

_seq = itertools.count()


def _free_underlay() -> IPv4Network:
    """A /24 no route of this machine uses yet (parallel test sessions each get their own)."""
    used = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
    for _ in range(200):
        net = IPv4Network(f"10.{random.randint(160, 199)}.{random.randint(0, 255)}.0/24")
        if str(net) not in used:
            return net
    raise RuntimeError("no free /24 for the test underlay")


class ClusterHarness:
    def __init__(
        self,
        tmp: Path,
        nodes: int,
        lease_seconds: int = 6,
        kvstore: str = "nats",
        node_labels: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.name = f"c{os.getpid() % 10000}{next(_seq)}"
        self.lc = LocalCluster(tmp / self.name)
        self.state: ClusterState = self.lc.up(
            nodes,
            name=self.name,
            underlay=_free_underlay(),
            lease_seconds=lease_seconds,
            kvstore=kvstore,
            node_labels=node_labels,
        )
        self.token = auth.load(self.state.creds_file).tokens["admin"]
        self.records: dict[str, dict[str, Any]] = {}  # ns/name -> endpoint record (with "node")
        self.internet: ClusterInternet | None = None

    # --- plumbing ---------------------------------------------------------------------------------

    def refresh(self) -> None:
        self.state = self.lc.state()

    @property
    def nodes(self) -> list[str]:
        return list(self.state.nodes)

    def api(self, node: str) -> str:
        return self.state.nodes[node].api

    def request(
        self, url: str, method: str, body: Any = None, ctype: str = "application/json"
    ) -> tuple[int, Any]:
        data = None
        if body is not None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("content-type", ctype)
        req.add_header("authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")
        except OSError as err:
            return 0, {"error": str(err)}

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO), **self.state.env()}

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "cilia"), *args], capture_output=True, text=True, timeout=timeout, env=self.env()
        )

    # --- endpoints --------------------------------------------------------------------------------

    def add(
        self, node: str, name: str, labels: dict[str, str], namespace: str = "default", **extra: Any
    ) -> dict[str, Any]:
        status, rec = self.request(
            f"{self.api(node)}/v1/endpoints",
            "POST",
            {"namespace": namespace, "name": name, "labels": labels, **extra},
        )
        if status != 200:
            pytest.fail(f"adding {namespace}/{name} on {node} failed: {status} {rec}")
        self.records[f"{namespace}/{name}"] = dict(rec)
        return dict(rec)

    def ip(self, ref: str) -> str:
        return str(self.records[ref]["ip"])

    def argv(self, ref: str, *cmd: str) -> list[str]:
        return ["nsenter", f"--net={self.records[ref]['network']['netns_path']}", "--", *cmd]

    def exec(self, ref: str, *cmd: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(ref, *cmd), capture_output=True, text=True, timeout=timeout)

    def spawn(self, ref: str, *cmd: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.argv(ref, *cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def serve(self, ref: str, kind: str, port: int) -> subprocess.Popen[bytes]:
        proc = self.spawn(ref, str(VENV_BIN / "python"), "-m", "cilia.demo_apps", kind, "--port", str(port))
        flag = "-lun" if kind == "udp-echo" else "-ltn"
        eventually(
            lambda: f":{port} " in self.exec(ref, "ss", "-H", flag).stdout, what=f"{kind} on {ref}:{port}"
        )
        return proc

    def probe(self, src: str, dst_ip: str, port: int, proto: str = "TCP", timeout: float = 1.0) -> bool:
        if proto == "ICMP":
            return self.exec(src, "ping", "-c1", "-W1", dst_ip).returncode == 0
        kind = "probe-tcp" if proto == "TCP" else "probe-udp"
        argv = [
            str(VENV_BIN / "python"),
            "-m",
            "cilia.demo_apps",
            kind,
            "--bind",
            dst_ip,
            "--port",
            str(port),
        ]
        return self.exec(src, *argv, "--timeout", str(timeout)).returncode == 0

    def remove_endpoints(self) -> None:
        for ref, rec in list(self.records.items()):
            ns, _, name = ref.partition("/")
            node = rec.get("node")
            if node in self.state.nodes:
                self.request(f"{self.api(node)}/v1/endpoints/{ns}/{name}", "DELETE")
            del self.records[ref]

    # --- policy -----------------------------------------------------------------------------------

    def status(self, node: str) -> dict[str, Any]:
        code, body = self.request(f"{self.api(node)}/v1/datapath/status", "GET")
        return dict(body) if code == 200 and isinstance(body, dict) else {}

    def apply(self, text: str, nodes: list[str] | None = None) -> int:
        code, body = self.request(
            f"{self.state.urls['policy']}/v1/policies", "POST", text, "application/yaml"
        )
        assert code == 200, body
        revision = int(body["revision"])
        names = ["/".join(x for x in (c["kind"], c["namespace"], c["name"]) if x) for c in body["changes"]]
        for node in nodes or self.nodes:
            eventually(
                lambda node=node: all(
                    self.status(node).get("policies", {}).get(n, -1) >= revision for n in names
                ),
                20,
                f"node {node} applying {names}",
            )
        return revision

    def delete_policy(self, name: str, kind: str = "CiliumNetworkPolicy", namespace: str = "default") -> None:
        code, body = self.request(
            f"{self.state.urls['policy']}/v1/policies/{kind}/{name}?namespace={namespace}", "DELETE"
        )
        assert code == 200, body
        key = "/".join(
            x for x in (kind, "" if kind == "CiliumClusterwideNetworkPolicy" else namespace, name) if x
        )
        for node in self.nodes:
            eventually(
                lambda node=node: key not in self.status(node).get("policies", {}),
                what=f"{node} dropping {key}",
            )

    def delete_all_policies(self) -> None:
        for name in list(self.status(self.nodes[0]).get("policies", {})):
            kind, _, rest = name.partition("/")
            ns, _, pname = rest.rpartition("/")
            self.delete_policy(pname, kind, ns or "default")

    def store(self, key: str, doc: dict[str, Any] | None) -> None:
        """Put (None: delete) a kvstore record as the cluster's services store them."""
        import asyncio

        from cilia.kvstore import connect

        async def run() -> None:
            user, password = auth.load(self.state.creds_file).nats_users["admin"]
            kv = await connect(
                self.state.kvstore_url, self.state.nats_url, nats_user=user, nats_password=password
            )
            try:
                if doc is None:
                    await kv.delete(key)
                else:
                    await kv.put(key, json.dumps(doc).encode())
            finally:
                await kv.close()

        asyncio.run(run())

    # --- observation --------------------------------------------------------------------------------

    def flows(self, node: str, last: int = 2000) -> list[dict[str, Any]]:
        code, body = self.request(f"{self.api(node)}/v1/flows?last={last}", "GET")
        assert code == 200, body
        return list(body["items"])

    def registry(self, node: str) -> dict[str, dict[str, Any]]:
        code, body = self.request(f"{self.api(node)}/v1/nodes", "GET")
        return {n["name"]: n for n in body["items"]} if code == 200 else {}

    def maps(self, node: str) -> maps.DatapathMaps:
        return maps.DatapathMaps.open(maps.pin_root(node))

    def ipcache(self, node: str) -> dict[str, tuple[int, str | None]]:
        m = self.maps(node)
        try:
            return {p: (i, t) for p, i, t in m.ipcache_items()}
        finally:
            m.close()

    def close(self) -> None:
        if self.internet is not None:
            self.internet.close()
        self.lc.down()


class ClusterInternet:
    """Outside addresses (world for policy) on a namespace attached to the cluster's underlay; every
    node routes them to it."""

    def __init__(self, cluster: ClusterHarness) -> None:
        self.cluster = cluster
        st = cluster.state
        self.netns = f"{st.name}-inet"
        net = IPv4Network(st.underlay)
        self.ip = str(net.network_address + 250)
        self.veth = f"{st.name}-ui"
        self.addresses: set[str] = set()
        self.procs: list[subprocess.Popen[bytes]] = []
        run = _ip
        run("netns", "add", self.netns)
        run("link", "add", self.veth, "type", "veth", "peer", "name", f"{st.name}-ti")
        run("link", "set", f"{st.name}-ti", "netns", self.netns)
        run("-n", self.netns, "link", "set", f"{st.name}-ti", "name", "eth0")
        run("-n", self.netns, "addr", "add", f"{self.ip}/{net.prefixlen}", "dev", "eth0")
        run("-n", self.netns, "link", "set", "eth0", "up")
        run("-n", self.netns, "link", "set", "lo", "up")
        run("link", "set", self.veth, "master", st.bridge)
        run("link", "set", self.veth, "up")
        for n in st.nodes.values():
            run("-n", self.netns, "route", "add", n.pod_cidr, "via", n.ip)
            # An earlier internet of this cluster had the same address and another MAC: a node that
            # still has it in its neighbour table would send there for half a minute.
            run("-n", n.netns, "neigh", "flush", "to", self.ip, check=False)

    def address(self, addr: str) -> None:
        if addr in self.addresses:
            return
        _ip("-n", self.netns, "addr", "add", f"{addr}/32", "dev", "lo")
        for n in self.cluster.state.nodes.values():
            _ip("-n", n.netns, "route", "replace", f"{addr}/32", "via", self.ip)
        self.addresses.add(addr)

    def serve(self, kind: str, addr: str, port: int) -> None:
        self.address(addr)
        self.procs.append(serve_in_netns(self.netns, kind, addr, port))

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        _ip("link", "del", self.veth, check=False)
        _ip("netns", "delete", self.netns, check=False)


def _ip(*argv: str, check: bool = True) -> None:
    proc = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {proc.stderr.strip()}")


@contextlib.contextmanager
def running_cluster(tmp: Path, nodes: int, **kw: Any) -> Iterator[ClusterHarness]:
    c = ClusterHarness(tmp, nodes, **kw)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterHarness]:
    """Three nodes, shared by a module's tests (each test removes its endpoints and policies)."""
    with running_cluster(tmp_path_factory.mktemp("cluster"), 3) as c:
        yield c


@pytest.fixture
def cluster(cluster3: ClusterHarness) -> Iterator[ClusterHarness]:
    try:
        yield cluster3
    finally:
        cluster3.remove_endpoints()
        with contextlib.suppress(Exception):
            cluster3.delete_all_policies()
        if cluster3.internet is not None:
            cluster3.internet.close()
            cluster3.internet = None
