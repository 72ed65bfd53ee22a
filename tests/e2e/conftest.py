"""e2e fixtures: network namespaces and endpoints made for one test and removed after it, even when it fails.

Namespaces get a unique name `ct-<pid>-<n>` so that parallel runs and leftovers of a crashed run never
collide; endpoint namespaces are named after their node's, so they are unique too.
"""

from __future__ import annotations

import contextlib
import itertools
import json as _json
import os
import signal as _signal
import subprocess
import time as _time
import urllib.error as _urlerror
import urllib.request as _urlrequest
import uuid as _uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass as _dataclass
from dataclasses import field as _field
from ipaddress import IPv4Address
from pathlib import Path as _Path
from typing import Any as _Any

import pytest
from support.servers import REPO, VENV_BIN, ServerProcess, find_binary, free_port, http_ready, nats_ready

from cilia import auth
from services.datapath import loader, maps
from services.datapath.plumbing import (
    NETNS_DIR,
    EndpointNetwork,
    create_endpoint,
    delete_endpoint,
    endpoint_names,
)

NODE_ADDRESS = IPv4Address("10.99.0.1")  # the test node's own address (on its lo: no dummy devices needed)
COMMAND_TIMEOUT = 30.0

_sequence = itertools.count()

NetnsFactory = Callable[..., str]
EndpointFactory = Callable[..., EndpointNetwork]


def unique_netns_name(prefix: str = "ct") -> str:
    """A namespace name no other test or run uses: `<prefix>-<pid>-<n>`."""
    return f"{prefix}-{os.getpid()}-{next(_sequence)}"


def ip(*argv: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip [-n netns] argv...` and return its output; fail the test with its stderr if it fails."""
    cmd = ["ip", *(["-n", netns] if netns else []), *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done


def netns_exists(name: str) -> bool:
    """Whether `ip netns` has a namespace of this name."""
    return (NETNS_DIR / name).exists()


@pytest.fixture
def make_netns() -> Iterator[NetnsFactory]:
    """A factory of fresh network namespaces (lo up); all are deleted at teardown."""
    made: list[str] = []

    def make(prefix: str = "ct") -> str:
        name = unique_netns_name(prefix)
        ip("netns", "add", name)
        made.append(name)
        ip("link", "set", "lo", "up", netns=name)
        return name

    yield make
    for name in reversed(made):
        if netns_exists(name):
            ip("netns", "delete", name, check=False)


@pytest.fixture
def netns(make_netns: NetnsFactory) -> str:
    """One fresh network namespace, deleted at teardown."""
    return make_netns()


@pytest.fixture
def node_address() -> IPv4Address:
    """The address the `node_netns` fixture's node has."""
    return NODE_ADDRESS


@pytest.fixture
def node_netns(make_netns: NetnsFactory, node_address: IPv4Address) -> str:
    """A fresh namespace acting as a node: lo up with the node's address `node_address`/32."""
    name = make_netns("ct")
    ip("addr", "add", f"{node_address}/32", "dev", "lo", netns=name)
    return name


@pytest.fixture
def make_endpoint(node_netns: str) -> Iterator[EndpointFactory]:
    """A factory of endpoints plumbed on `node_netns` (`make_endpoint("default", "a", "10.0.1.2")`).

    At teardown each is deleted, and its namespace removed even if creating it failed half-way.
    """
    records: list[EndpointNetwork] = []
    managed: list[str] = []

    def make(
        namespace: str, name: str, address: IPv4Address | str, *, netns_path: str | None = None
    ) -> EndpointNetwork:
        if netns_path is None:
            managed.append(endpoint_names(namespace, name, node_netns).netns)
        record = create_endpoint(namespace, name, address, node_netns=node_netns, netns_path=netns_path)
        records.append(record)
        return record

    yield make
    for record in reversed(records):
        try:
            delete_endpoint(record)
        except Exception as err:  # go on: the namespaces are removed below all the same
            print(f"teardown: delete_endpoint({record.endpoint}) failed: {err!r}")
    for name in managed:
        if netns_exists(name):
            ip("netns", "delete", name, check=False)


# --- a datapath node with its control plane -----------------------------------------------------

E2E_NODE = f"e2e{os.getpid()}"  # one pin root (programs compiled once) for the whole session
POD_CIDR = "10.201.0.0/24"
POLL = 0.05


def eventually(check: Callable[[], _Any], timeout: float = 10.0, what: str = "the condition") -> _Any:
    """Poll `check()` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = _time.monotonic() + timeout
    last: _Any = None
    while _time.monotonic() < deadline:
        last = check()
        if last:
            return last
        _time.sleep(POLL)
    pytest.fail(f"{what} did not happen within {timeout} s (last: {last!r})")


@_dataclass
class ControlPlane:
    """NATS, the identity service and credentials, shared by the session's nodes."""

    nats: ServerProcess
    identity: ServerProcess
    creds: auth.Credentials
    creds_file: _Path

    def ensure_running(self) -> None:
        self.nats.start()
        self.identity.start()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    d = tmp_path_factory.mktemp("cp")
    creds = auth.generate()
    creds_file = auth.write(creds, d / "credentials.yaml")
    port = free_port()
    nats = ServerProcess(
        "nats-server",
        [find_binary("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(d / "js")],
        f"nats://127.0.0.1:{port}",
        nats_ready(port),
        d / "nats.log",
    )
    hport = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CILIA_NATS_URL": nats.url,
        "CILIA_TOKEN_FILE": str(creds_file),
        "CILIA_HTTP_ADDR": f"127.0.0.1:{hport}",
    }
    identity = ServerProcess(
        "cilia-identity",
        [str(VENV_BIN / "python"), "-m", "services.identity"],
        f"http://127.0.0.1:{hport}",
        http_ready(hport),
        d / "identity.log",
        env,
    )
    cp = ControlPlane(nats, identity, creds, creds_file)
    try:
        nats.start()
        identity.start()
        yield cp
    finally:
        identity.stop()
        nats.stop()


@pytest.fixture(scope="session")
def node_pins() -> Iterator[_Path]:
    """The session node's bpffs directory: programs compiled once, removed at the end of the session."""
    root = maps.pin_root(E2E_NODE)
    loader.remove_pins(root)
    try:
        yield root
    finally:
        loader.remove_pins(root)


@_dataclass
class Node:
    """A node namespace with its datapath agent (and a policy service of its own)."""

    name: str
    netns: str
    cp: ControlPlane
    agent: ServerProcess
    policy: ServerProcess
    state_dir: _Path
    spawned: list[subprocess.Popen[bytes]] = _field(default_factory=list)
    unique: str = ""  # the suffix of this node's kvstore buckets (policies, endpoints, services, nodes)
    records: dict[str, dict[str, _Any]] = _field(
        default_factory=dict
    )  # endpoints as added (usable with the agent down)

    @property
    def token(self) -> str:
        return self.cp.creds.tokens["admin"]

    def request(
        self, base: str, method: str, path: str, body: _Any = None, ctype: str = "application/json"
    ) -> tuple[int, _Any]:
        data = None
        if body is not None:
            data = body.encode() if isinstance(body, str) else _json.dumps(body).encode()
        req = _urlrequest.Request(f"{base}{path}", data=data, method=method)
        req.add_header("content-type", ctype)
        req.add_header("authorization", f"Bearer {self.token}")
        try:
            with _urlrequest.urlopen(req, timeout=30) as resp:
                return resp.status, _json.loads(resp.read() or b"null")
        except _urlerror.HTTPError as err:
            return err.code, _json.loads(err.read() or b"null")

    def api(self, method: str, path: str, body: _Any = None) -> tuple[int, _Any]:
        return self.request(self.agent.url, method, path, body)

    def add(
        self, name: str, labels: dict[str, str], namespace: str = "default", **extra: _Any
    ) -> dict[str, _Any]:
        status, rec = self.api(
            "POST", "/v1/endpoints", {"namespace": namespace, "name": name, "labels": labels, **extra}
        )
        if status != 200:
            pytest.fail(f"adding endpoint {namespace}/{name} failed: {status} {rec}")
        self.records[f"{namespace}/{name}"] = dict(rec)
        return dict(rec)

    def endpoint(self, ref: str) -> dict[str, _Any]:
        ns, _, name = ref.rpartition("/")
        status, rec = self.api("GET", f"/v1/endpoints/{ns or 'default'}/{name}")
        assert status == 200, rec
        return dict(rec)

    def argv(self, ref: str, *cmd: str) -> list[str]:
        rec = self.records.get(ref) or self.endpoint(ref)
        return ["nsenter", f"--net={rec['network']['netns_path']}", "--", *cmd]

    def exec(
        self, ref: str, *cmd: str, timeout: float = 20, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(ref, *cmd), capture_output=True, text=True, timeout=timeout, input=input
        )

    def spawn(self, ref: str, *cmd: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            self.argv(ref, *cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self.spawned.append(proc)
        return proc

    def serve(self, ref: str, kind: str, port: int) -> subprocess.Popen[bytes]:
        """Start a demo workload (http, tcp-echo, udp-echo) in the endpoint and wait until it listens."""
        proc = self.spawn(ref, str(VENV_BIN / "python"), "-m", "cilia.demo_apps", kind, "--port", str(port))
        flag = "-lun" if kind == "udp-echo" else "-ltn"
        eventually(
            lambda: f":{port} " in self.exec(ref, "ss", "-H", flag).stdout,
            what=f"{kind} listening on {ref}:{port}",
        )
        return proc

    def apply(self, text: str) -> int:
        status, body = self.request(self.policy.url, "POST", "/v1/policies", text, "application/yaml")
        assert status == 200, body
        revision = int(body["revision"])
        names = ["/".join(x for x in (c["kind"], c["namespace"], c["name"]) if x) for c in body["changes"]]
        self.wait_applied(names, revision)
        return revision

    def delete_policy(self, name: str, kind: str = "CiliumNetworkPolicy", namespace: str = "default") -> None:
        status, body = self.request(
            self.policy.url, "DELETE", f"/v1/policies/{kind}/{name}?namespace={namespace}"
        )
        assert status == 200, body
        key = "/".join(
            x for x in (kind, "" if kind == "CiliumClusterwideNetworkPolicy" else namespace, name) if x
        )
        eventually(lambda: key not in self.status().get("policies", {}), what=f"the agent dropping {key}")

    def status(self) -> dict[str, _Any]:
        status, body = self.api("GET", "/v1/datapath/status")
        return dict(body) if status == 200 and isinstance(body, dict) else {}

    def wait_applied(self, names: list[str], revision: int, timeout: float = 10.0) -> None:
        def done() -> bool:
            applied = self.status().get("policies", {})
            return all(applied.get(n, -1) >= revision for n in names)

        eventually(done, timeout, what=f"the agent applying {names} at revision {revision}")

    def flows(self, last: int = 1000) -> list[dict[str, _Any]]:
        status, body = self.api("GET", f"/v1/flows?last={last}")
        assert status == 200, body
        return list(body["items"])

    def maps(self) -> maps.DatapathMaps:
        return maps.DatapathMaps.open(maps.pin_root(self.name))

    def ip(self, ref: str) -> str:
        return str((self.records.get(ref) or self.endpoint(ref))["ip"])

    def cleanup(self) -> None:
        for proc in self.spawned:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, _signal.SIGKILL)
                proc.wait()
        if self.agent.running:
            status, body = self.api("GET", "/v1/endpoints")
            for rec in (body or {}).get("items", []) if status == 200 else []:
                self.api("DELETE", f"/v1/endpoints/{rec['namespace']}/{rec['name']}")
        self.agent.stop()
        self.policy.stop()
        # Whatever the agent could not remove (it crashed): delete from its state file.
        state = self.state_dir / self.name / "endpoints.json"
        if state.exists():
            for raw in _json.loads(state.read_text()).get("endpoints", []):
                with contextlib.suppress(Exception):
                    delete_endpoint(EndpointNetwork.from_dict(raw["network"]))


@pytest.fixture
def node(control_plane: ControlPlane, node_pins: _Path, tmp_path: _Path) -> Iterator[Node]:
    """A fresh node namespace, a policy service with its own bucket, and a datapath agent."""
    control_plane.ensure_running()
    netns = unique_netns_name("cn")
    ip("netns", "add", netns)
    unique = _uuid.uuid4().hex[:10]
    n: Node | None = None
    try:
        ip("link", "set", "lo", "up", netns=netns)
        ip("addr", "add", f"{NODE_ADDRESS}/32", "dev", "lo", netns=netns)
        common = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "CILIA_NATS_URL": control_plane.nats.url,
            "CILIA_TOKEN_FILE": str(control_plane.creds_file),
            "CILIA_POLICY_BUCKET": f"pol{unique}",
        }
        pport = free_port()
        policy = ServerProcess(
            "cilia-policy",
            [str(VENV_BIN / "python"), "-m", "services.policy"],
            f"http://127.0.0.1:{pport}",
            http_ready(pport),
            tmp_path / "policy.log",
            {**common, "CILIA_HTTP_ADDR": f"127.0.0.1:{pport}"},
        )
        policy.start()
        aport = free_port()
        agent = ServerProcess(
            "cilia-datapath",
            [str(VENV_BIN / "python"), "-m", "services.datapath"],
            f"http://127.0.0.1:{aport}",
            http_ready(aport),
            tmp_path / "datapath.log",
            {
                **common,
                "CILIA_HTTP_ADDR": f"127.0.0.1:{aport}",
                "CILIA_NODE": E2E_NODE,
                "CILIA_NODE_NETNS": netns,
                "CILIA_POD_CIDR": POD_CIDR,
                "CILIA_STATE_DIR": str(tmp_path / "state"),
                "CILIA_ENDPOINTS_BUCKET": f"ep{unique}",
                "CILIA_SERVICES_BUCKET": f"svc{unique}",
                "CILIA_NODES_BUCKET": f"nodes{unique}",
            },
        )
        n = Node(E2E_NODE, netns, control_plane, agent, policy, tmp_path / "state", unique=unique)
        agent.start(timeout=60)
        eventually(lambda: n.status().get("policies_synced"), 20, "the agent's first policy snapshot")
        yield n
    finally:
        if n is not None:
            n.cleanup()
        ip("netns", "delete", netns, check=False)


INET_NODE_SIDE = "172.31.255.1"
INET_SIDE = "172.31.255.2"


def serve_in_netns(netns: str, kind: str, addr: str, port: int) -> subprocess.Popen[bytes]:
    """Start a demo workload (http, tcp-echo, udp-echo) on addr:port in a named namespace, listening."""
    argv = ["nsenter", f"--net=/run/netns/{netns}", "--", str(VENV_BIN / "python"), "-m", "cilia.demo_apps"]
    proc = subprocess.Popen(
        [*argv, kind, "--bind", addr, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    flag = "-lun" if kind == "udp-echo" else "-ltn"
    eventually(
        lambda: (
            f"{addr}:{port} "
            in subprocess.run(
                ["nsenter", f"--net=/run/netns/{netns}", "--", "ss", "-H", flag],
                capture_output=True,
                text=True,
            ).stdout
        ),
        what=f"{kind} on {addr}:{port}",
    )
    return proc


class Internet:
    """A namespace beyond the node holding outside addresses (world for policy)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.netns = unique_netns_name("inet")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.addresses: set[str] = set()
        ip("netns", "add", self.netns)
        ip(
            "link",
            "add",
            "vinet",
            "netns",
            node.netns,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            self.netns,
        )
        ip("addr", "add", f"{INET_NODE_SIDE}/30", "dev", "vinet", netns=node.netns)
        ip("link", "set", "vinet", "up", netns=node.netns)
        ip("addr", "add", f"{INET_SIDE}/30", "dev", "eth0", netns=self.netns)
        ip("link", "set", "eth0", "up", netns=self.netns)
        ip("link", "set", "lo", "up", netns=self.netns)
        ip("route", "add", "10.201.0.0/24", "via", INET_NODE_SIDE, netns=self.netns)

    def address(self, addr: str) -> None:
        if addr not in self.addresses:
            ip("addr", "add", f"{addr}/32", "dev", "lo", netns=self.netns)
            ip("route", "add", f"{addr}/32", "via", INET_SIDE, netns=self.node.netns)
            self.addresses.add(addr)

    def serve(self, kind: str, addr: str, port: int) -> None:
        self.address(addr)
        self.procs.append(serve_in_netns(self.netns, kind, addr, port))

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        ip("link", "del", "vinet", netns=self.node.netns, check=False)
        ip("netns", "delete", self.netns, check=False)


@pytest.fixture
def internet(node: Node) -> Iterator[Internet]:
    inet = Internet(node)
    try:
        yield inet
    finally:
        inet.close()


# --- the node's L7 (HTTP) proxy -----------------------------------------------------------------


class L7Proxy:
    """The node's l7proxy process: its data plane in the node's namespace, its API on 127.0.0.1."""

    def __init__(self, node: Node, log_dir: _Path, port: int = 15001, **settings: str) -> None:
        self.node = node
        self.port = port
        api = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "CILIA_NATS_URL": node.cp.nats.url,
            "CILIA_TOKEN_FILE": str(node.cp.creds_file),
            "CILIA_HTTP_ADDR": f"127.0.0.1:{api}",
            "CILIA_NODE": node.name,
            "CILIA_NODE_NETNS": node.netns,
            "CILIA_PROXY_PORT": str(port),
            **{f"CILIA_{k.upper()}": v for k, v in settings.items()},
        }
        self.proc = ServerProcess(
            "cilia-l7proxy",
            [str(VENV_BIN / "python"), "-m", "services.l7proxy"],
            f"http://127.0.0.1:{api}",
            http_ready(api, "/healthz"),
            log_dir / "l7proxy.log",
            env,
        )

    @property
    def pid(self) -> int:
        proc = self.proc._proc
        assert proc is not None, "the l7proxy is not running"
        return proc.pid

    def rss_kib(self) -> int:
        """The proxy process's resident memory (VmRSS), in KiB."""
        for line in _Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def registered(self) -> bool:
        return str(self.port) in self.node.status().get("proxies", {})

    def start(self, timeout: float = 30.0) -> None:
        """Start the proxy and wait until the node's agent has its registration (redirects work)."""
        self.proc.start(timeout)
        eventually(self.registered, timeout, what="the l7proxy registering with the datapath agent")

    def kill(self) -> None:
        self.proc.kill()

    def stop(self) -> None:
        self.proc.stop()

    def status(self) -> dict[str, _Any]:
        status, body = self.node.request(self.proc.url, "GET", "/v1/l7proxy/status")
        return dict(body) if status == 200 and isinstance(body, dict) else {}

    def metrics(self) -> str:
        with _urlrequest.urlopen(f"{self.proc.url}/metrics", timeout=10) as resp:
            return str(resp.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of /metrics (0 when it is not there yet)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        key = f"{name}{{{want}}}" if labels else name
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            sample, _, value = line.rpartition(" ")
            if sample == key:
                return float(value)
        return 0.0


@pytest.fixture
def l7proxy_settings() -> dict[str, str]:
    """Extra `CILIA_*` settings for the `l7proxy` fixture (a module overrides this fixture)."""
    return {}


@pytest.fixture
def l7proxy(node: Node, tmp_path: _Path, l7proxy_settings: dict[str, str]) -> Iterator[L7Proxy]:
    """The node's HTTP proxy, registered with its agent; stopped (its registration gone) at teardown."""
    proxy = L7Proxy(node, tmp_path, **l7proxy_settings)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def dnsproxy(node: Node, tmp_path: _Path) -> Iterator[_Any]:
    """The node's DNS proxy (tests/e2e/dns_harness.py), registered with the agent; stopped after."""
    from dns_harness import DNSProxyProcess

    proxy = DNSProxyProcess(node, tmp_path)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.stop()
