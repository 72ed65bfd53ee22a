"""A whole cilia cluster on one machine — the `kind create cluster` of cilia (ARCHITECTURE.md §9).

`cilia cluster up --nodes N` builds, in the background:

- an underlay: a bridge in the root namespace (`<name>-br`, the first address of the underlay
  subnet) with one "uplink" veth per node;
- the control plane on the bridge address: nats-server with JetStream and per-role users (or etcd
  too, with `--kvstore etcd`), the identity and policy services;
- N nodes named `<name>-node1`... (like kind's `kind-worker`: node names, pinned maps and node-local
  sockets are machine-wide, so the cluster's name is part of each node's), each a network namespace
  of that name with its uplink (`eth0`, the node's underlay
  address), a pod CIDR of its own and its agents running *inside* it (`CILIA_NODE=<node>`): the
  datapath agent (and the node's proxies when they are installed). The datapath makes the VXLAN
  overlay between nodes.

Everything it makes is recorded in the state directory (`cluster.json`, pid files, logs,
credentials), so `cilia cluster status`, `cilia node add|delete` and `cilia cluster down` work from
any later shell, and `down` removes every namespace, link, pinned map and process it made.
Blocking code (subprocesses, HTTP polling): the CLI and test fixtures call it directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from cilia import auth
from cilia.errors import CiliaError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = Path("/var/lib/cilia/cluster")
DEFAULT_UNDERLAY = IPv4Network("10.250.0.0/24")
DEFAULT_POD_CIDRS = IPv4Network("10.200.0.0/16")
DATAPATH_PORT = 9103
DNSPROXY_PORT = 9104  # the DNS proxy's API (its DNS port is CILIA_TOFQDNS_PROXY_PORT, 10053)
L7PROXY_PORT = 9105  # the HTTP proxy's API (it proxies on CILIA_PROXY_PORT, 15001)
ANNOUNCER_PORT = 9107
NODE_AGENTS = ("datapath", "dnsproxy", "l7proxy", "announcer")
UNDERLAY_MTU = 9000  # room for the VXLAN header: pods keep an MTU of 1500
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
NODE_RE = re.compile(r"^[a-z][a-z0-9-]{0,23}$")
READY_TIMEOUT = 120.0


class ClusterError(CiliaError):
    """The local cluster cannot be built, changed or removed as asked."""


@dataclass
class NodeState:
    name: str
    index: int
    netns: str
    ip: str
    pod_cidr: str
    uplink: str  # the root-namespace end of the node's uplink veth
    processes: dict[str, int] = field(default_factory=dict)  # role -> pid
    labels: dict[str, str] = field(default_factory=dict)  # CILIA_NODE_LABELS of its agents

    @property
    def api(self) -> str:
        return f"http://{self.ip}:{DATAPATH_PORT}"

    @property
    def announcer_api(self) -> str:
        return f"http://{self.ip}:{ANNOUNCER_PORT}"

    @property
    def dnsproxy_api(self) -> str:
        return f"http://{self.ip}:{DNSPROXY_PORT}"

    @property
    def l7proxy_api(self) -> str:
        return f"http://{self.ip}:{L7PROXY_PORT}"

    def urls(self) -> dict[str, str]:
        """The API of each of the node's agents, by role."""
        return {
            "datapath": self.api,
            "dnsproxy": self.dnsproxy_api,
            "l7proxy": self.l7proxy_api,
            "announcer": self.announcer_api,
        }


@dataclass
class ClusterState:
    name: str
    state_dir: str
    underlay: str
    bridge: str
    gateway: str
    pod_cidrs: str
    kvstore: str  # "nats" or "etcd"
    nats_url: str
    kvstore_url: str  # what CILIA_KVSTORE says ("nats" or "etcd://...")
    urls: dict[str, str]
    lease_seconds: int
    processes: dict[str, int] = field(default_factory=dict)  # control plane: role -> pid
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> how it was started
    nodes: dict[str, NodeState] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    @property
    def dir(self) -> Path:
        return Path(self.state_dir)

    @property
    def creds_file(self) -> Path:
        return self.dir / "credentials.yaml"

    def save(self) -> None:
        doc = asdict(self)
        tmp = self.dir / "cluster.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(self.dir / "cluster.json")

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState:
        path = state_dir / "cluster.json"
        if not path.exists():
            raise ClusterError(f"no cluster in {state_dir} (start one with `cilia cluster up`)")
        doc = json.loads(path.read_text())
        nodes = {k: NodeState(**v) for k, v in doc.pop("nodes", {}).items()}
        return cls(**doc, nodes=nodes)

    def env(self) -> dict[str, str]:
        """The settings a client (the CLI) uses to reach this cluster."""
        first = next(iter(self.nodes.values()), None)
        out = {
            "CILIA_NATS_URL": self.nats_url,
            "CILIA_TOKEN_FILE": str(self.creds_file),
            "CILIA_IDENTITY_URL": self.urls["identity"],
            "CILIA_POLICY_URL": self.urls["policy"],
            "CILIA_CLUSTER_DIR": self.state_dir,
        }
        if "lbipam" in self.urls:
            out["CILIA_LBIPAM_URL"] = self.urls["lbipam"]
        if self.kvstore != "nats":
            out["CILIA_KVSTORE"] = self.kvstore_url
        if first is not None:
            out["CILIA_DATAPATH_URL"] = first.api
        return out


# --- small helpers ---------------------------------------------------------------------------------


def _run(argv: list[str], check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    if netns:
        argv = ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own exited child) is not alive.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _stop(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not process_alive(pid):
                return
            time.sleep(0.05)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _nats_ready(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            return s.recv(4).startswith(b"INFO")
    except OSError:
        return False


def _wait(what: str, check: Any, log: Path | None, timeout: float = READY_TIMEOUT, pid: int = 0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if pid and not process_alive(pid):
            break
        time.sleep(0.1)
    tail = ""
    if log is not None and log.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    state = "exited" if pid and not process_alive(pid) else f"was not ready within {timeout:.0f}s"
    raise ClusterError(f"{what} {state}" + (f"; the end of {log}:\n{tail}" if tail else ""))


def find_binary(name: str) -> str:
    venv = Path(sys.executable).parent
    found = shutil.which(name, path=f"{venv}:{os.environ.get('PATH', '')}:/usr/sbin:/usr/bin")
    if found is None:
        raise ClusterError(f"{name} is not installed (run `make bootstrap`)")
    return found


# --- the cluster -----------------------------------------------------------------------------------


class LocalCluster:
    """Build, inspect, grow, shrink and remove a cluster recorded in `state_dir`."""

    def __init__(self, state_dir: Path | str = DEFAULT_STATE_DIR) -> None:
        self.dir = Path(state_dir).resolve()

    @property
    def exists(self) -> bool:
        return (self.dir / "cluster.json").exists()

    def state(self) -> ClusterState:
        return ClusterState.load(self.dir)

    # --- up ---------------------------------------------------------------------------------------

    def up(
        self,
        nodes: int | Iterable[str] = 1,
        *,
        name: str = "cilia",
        kvstore: str = "nats",
        underlay: IPv4Network | str = DEFAULT_UNDERLAY,
        pod_cidrs: IPv4Network | str = DEFAULT_POD_CIDRS,
        lease_seconds: int = 15,
        extra_env: Mapping[str, str] | None = None,
        node_labels: Mapping[str, Mapping[str, str]] | None = None,
    ) -> ClusterState:
        """Build the cluster and wait until every part is ready; on failure remove what was made.

        `node_labels` gives nodes (by short or full name) labels that L2 and BGP nodeSelectors match."""
        if os.geteuid() != 0:
            raise ClusterError("a local cluster needs root (namespaces, links, BPF)")
        if not NAME_RE.match(name):
            raise ClusterError(
                f"cluster name {name!r}: 1-8 lower-case letters and digits, starting with a letter"
            )
        if kvstore not in ("nats", "etcd"):
            raise ClusterError(f"--kvstore {kvstore!r}: nats or etcd")
        short = [f"node{i + 1}" for i in range(nodes)] if isinstance(nodes, int) else list(nodes)
        names = [f"{name}-{n}" for n in short]
        if not names:
            raise ClusterError("a cluster needs at least one node")
        for n in names:
            if not NODE_RE.match(n):
                raise ClusterError(f"node name {n!r}: lower-case letters, digits and '-', at most 15")
        if len(set(names)) != len(names):
            raise ClusterError("node names must be unique")
        if self.exists:
            old = self.state()
            if any(process_alive(p) for p in old.processes.values()):
                raise ClusterError(f"a cluster is already up in {self.dir} (`cilia cluster down` first)")
            self.down()
        net = IPv4Network(underlay)
        pods = IPv4Network(pod_cidrs)
        if net.num_addresses < len(names) + 12 or 2 ** (24 - min(pods.prefixlen, 24)) <= len(names):
            raise ClusterError(f"underlay {net} or pod CIDRs {pods} too small for {len(names)} nodes")
        bridge = f"{name}-br"
        exists = _run(["ip", "link", "show", bridge], check=False).returncode == 0
        if exists and not sweep_leftovers(name):
            raise ClusterError(
                f"link {bridge} exists already: another cluster named {name!r} is up (use --name)"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        gateway = str(next(net.hosts()))
        creds = auth.generate()
        auth.write(creds, self.dir / "credentials.yaml")
        state = ClusterState(
            name=name,
            state_dir=str(self.dir),
            underlay=str(net),
            bridge=bridge,
            gateway=gateway,
            pod_cidrs=str(pods),
            kvstore=kvstore,
            nats_url="",
            kvstore_url="nats",
            urls={},
            lease_seconds=lease_seconds,
        )
        state.save()
        try:
            self._underlay(state)
            self._control_plane(state, creds, extra_env or {})
            state.save()
            for n in names:
                brief = n.removeprefix(f"{name}-")
                labels = dict((node_labels or {}).get(n) or (node_labels or {}).get(brief) or {})
                self._add_node(state, n, extra_env or {}, labels)
                state.save()
            for node in state.nodes.values():
                self._wait_node(state, node)
        except BaseException:
            with contextlib.suppress(Exception):
                self.down()
            raise
        return state

    def _underlay(self, state: ClusterState) -> None:
        prefix = IPv4Network(state.underlay).prefixlen
        _run(["ip", "link", "add", state.bridge, "type", "bridge"])
        _run(["ip", "link", "set", state.bridge, "mtu", str(UNDERLAY_MTU)])
        _run(["ip", "addr", "add", f"{state.gateway}/{prefix}", "dev", state.bridge])
        _run(["ip", "link", "set", state.bridge, "up"])

    def _spawn(
        self,
        state: ClusterState,
        role: str,
        argv: list[str],
        env: Mapping[str, str],
        netns: str | None = None,
    ) -> int:
        if netns:
            # nsenter, not `ip netns exec`: the latter remounts /sys and hides the bpffs.
            argv = ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]
        state.commands[role] = {"argv": argv, "env": dict(env)}
        log = (state.dir / "logs" / f"{role}.log").open("ab")
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            start_new_session=True,
            cwd=str(REPO),
        )
        log.close()
        (state.dir / "pids").mkdir(exist_ok=True)
        (state.dir / "pids" / f"{role}.pid").write_text(f"{proc.pid}\n")
        return proc.pid

    def _common_env(self, state: ClusterState) -> dict[str, str]:
        env = {
            "PYTHONPATH": str(REPO),
            "CILIA_NATS_URL": state.nats_url,
            "CILIA_TOKEN_FILE": str(state.creds_file),
        }
        if state.kvstore != "nats":
            env["CILIA_KVSTORE"] = state.kvstore_url
        return env

    def _control_plane(self, state: ClusterState, creds: auth.Credentials, extra: Mapping[str, str]) -> None:
        gw = state.gateway
        nport = _free_port(gw)
        conf = state.dir / "nats.conf"
        conf.write_text(auth.nats_config(creds, gw, nport, state.dir / "jetstream"))
        conf.chmod(0o600)
        state.nats_url = f"nats://{gw}:{nport}"
        pid = self._spawn(state, "nats", [find_binary("nats-server"), "-c", str(conf)], {})
        state.processes["nats"] = pid
        _wait("nats-server", lambda: _nats_ready(gw, nport), state.dir / "logs" / "nats.log", pid=pid)
        if state.kvstore == "etcd":
            cport, pport = _free_port(gw), _free_port("127.0.0.1")
            argv = [
                find_binary("etcd"),
                "--name", f"{state.name}-etcd",
                "--data-dir", str(state.dir / "etcd"),
                "--listen-client-urls", f"http://{gw}:{cport}",
                "--advertise-client-urls", f"http://{gw}:{cport}",
                "--listen-peer-urls", f"http://127.0.0.1:{pport}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
                "--initial-cluster", f"{state.name}-etcd=http://127.0.0.1:{pport}",
            ]  # fmt: skip
            pid = self._spawn(state, "etcd", argv, {"ETCD_UNSUPPORTED_ARCH": "", "ETCD_LOG_LEVEL": "warn"})
            state.processes["etcd"] = pid
            state.kvstore_url = f"etcd://{gw}:{cport}"
            _wait(
                "etcd",
                lambda: _ready_etcd(gw, cport),
                state.dir / "logs" / "etcd.log",
                pid=pid,
            )
        env = {**self._common_env(state), **extra}
        for role in ("identity", "policy", "lbipam"):
            port = _free_port(gw)
            state.urls[role] = f"http://{gw}:{port}"
            pid = self._spawn(
                state,
                role,
                [sys.executable, "-m", f"services.{role}"],
                {**env, "CILIA_HTTP_ADDR": f"{gw}:{port}"},
            )
            state.processes[role] = pid
        for role in ("identity", "policy", "lbipam"):
            _wait(
                f"the {role} service",
                lambda r=role: _ready(state.urls[r]),
                state.dir / "logs" / f"{role}.log",
                pid=state.processes[role],
            )

    # --- nodes ------------------------------------------------------------------------------------

    def node_name(self, state: ClusterState, node: str) -> str:
        """`node2` or `<cluster>-node2` -> the node's full name."""
        return node if node.startswith(f"{state.name}-") else f"{state.name}-{node}"

    def add_node(
        self, node: str, extra_env: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None
    ) -> NodeState:
        """Add a node (`worker3` becomes `<cluster>-worker3`) and wait until its agents are ready."""
        state = self.state()
        node = self.node_name(state, node)
        if not NODE_RE.match(node):
            raise ClusterError(f"node name {node!r}: lower-case letters, digits and '-', at most 24")
        if node in state.nodes:
            raise ClusterError(f"node {node} exists already")
        n = self._add_node(state, node, extra_env or {}, dict(labels or {}))
        state.save()
        self._wait_node(state, n)
        return n

    def _add_node(
        self,
        state: ClusterState,
        node: str,
        extra: Mapping[str, str],
        labels: Mapping[str, str] | None = None,
    ) -> NodeState:
        used = {n.index for n in state.nodes.values()}
        index = next(i for i in range(1, 250) if i not in used)
        net = IPv4Network(state.underlay)
        pods = IPv4Network(state.pod_cidrs)
        ip = str(net.network_address + 10 + index)
        if IPv4Address(ip) not in net:
            raise ClusterError(f"the underlay {net} has no address left for node {node}")
        pod_cidr = list(pods.subnets(new_prefix=24))[index]
        n = NodeState(
            name=node,
            index=index,
            netns=node,
            ip=ip,
            pod_cidr=str(pod_cidr),
            uplink=f"{state.name}-u{index}",
            labels=dict(labels or {}),
        )
        state.nodes[node] = n
        state.save()
        tmp = f"{state.name}-t{index}"
        _run(["ip", "netns", "add", n.netns])
        _run(["ip", "link", "set", "lo", "up"], netns=n.netns)
        _run(["ip", "link", "add", n.uplink, "mtu", str(UNDERLAY_MTU), "type", "veth", "peer", "name", tmp])
        _run(["ip", "link", "set", tmp, "netns", n.netns])
        _run(["ip", "link", "set", tmp, "name", "eth0"], netns=n.netns)
        _run(["ip", "link", "set", "eth0", "mtu", str(UNDERLAY_MTU)], netns=n.netns)
        _run(["ip", "addr", "add", f"{ip}/{net.prefixlen}", "dev", "eth0"], netns=n.netns)
        _run(["ip", "link", "set", "eth0", "up"], netns=n.netns)
        _run(["ip", "route", "add", "default", "via", state.gateway], netns=n.netns)
        _run(["ip", "link", "set", n.uplink, "master", state.bridge])
        _run(["ip", "link", "set", n.uplink, "up"])
        env = {
            **self._common_env(state),
            "CILIA_NODE": node,
            "CILIA_NODE_IP": ip,
            "CILIA_POD_CIDR": str(pod_cidr),
            "CILIA_STATE_DIR": str(state.dir / "nodes"),
            "CILIA_NODE_LEASE_SECONDS": str(state.lease_seconds),
            "CILIA_NODE_LABELS": ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())),
            **extra,
        }
        n.processes["datapath"] = self._spawn(
            state,
            f"{node}-datapath",
            [sys.executable, "-m", "services.datapath"],
            {**env, "CILIA_HTTP_ADDR": f"{ip}:{DATAPATH_PORT}"},
            netns=n.netns,
        )
        # The node's proxies (they register with its datapath over the node-local socket) and its
        # L2/BGP announcer (LB-IPAM's per-node half), all in the node like its datapath.
        for role, module, port in (
            ("dnsproxy", "services.dnsproxy", DNSPROXY_PORT),
            ("l7proxy", "services.l7proxy", L7PROXY_PORT),
            ("announcer", "services.lbipam.announcer", ANNOUNCER_PORT),
        ):
            n.processes[role] = self._spawn(
                state,
                f"{node}-{role}",
                [sys.executable, "-m", module],
                {**env, "CILIA_HTTP_ADDR": f"{ip}:{port}"},
                netns=n.netns,
            )
        return n

    def _wait_node(self, state: ClusterState, node: NodeState) -> None:
        _wait(
            f"the datapath agent of node {node.name}",
            lambda: _ready(node.api),
            state.dir / "logs" / f"{node.name}-datapath.log",
            pid=node.processes.get("datapath", 0),
        )
        urls = node.urls()
        for role in NODE_AGENTS[1:]:
            if role in node.processes:
                url = urls[role]
                _wait(
                    f"the {role} of node {node.name}",
                    lambda url=url: _ready(url),
                    state.dir / "logs" / f"{node.name}-{role}.log",
                    pid=node.processes.get(role, 0),
                )
        if "dnsproxy" in node.processes or "l7proxy" in node.processes:
            want = sum(role in node.processes for role in ("dnsproxy", "l7proxy"))
            token = auth.load(state.creds_file).tokens.get("admin", "")
            _wait(
                f"the proxies of node {node.name} registering with its datapath",
                lambda: _registered_proxies(node.api, token) >= want,
                state.dir / "logs" / f"{node.name}-datapath.log",
                pid=node.processes.get("datapath", 0),
            )

    def delete_node(self, node: str) -> None:
        """Stop a node's agents and remove its endpoints, namespace, links and pinned maps."""
        state = self.state()
        n = state.nodes.get(self.node_name(state, node))
        if n is None:
            raise ClusterError(f"node {node} is not in the cluster (see `cilia node list`)")
        self._remove_node(state, n, forget=True)
        del state.nodes[n.name]
        state.save()

    def _remove_node(self, state: ClusterState, n: NodeState, forget: bool = False) -> None:
        for pid in n.processes.values():
            _stop(pid)
        if forget:
            _forget_node(state, n.name)
        _remove_endpoints(state.dir / "nodes" / n.name / "endpoints.json")
        _run(["ip", "netns", "delete", n.netns], check=False)
        _run(["ip", "link", "del", n.uplink], check=False)
        from services.datapath import loader, maps

        loader.remove_pins(maps.pin_root(n.name))
        for pidfile in (state.dir / "pids").glob(f"{n.name}-*.pid"):
            pidfile.unlink(missing_ok=True)

    def kill_node(self, node: str) -> None:
        """Make a node die the hard way: SIGKILL its agents and delete its namespace, nothing else
        (its registry entry and endpoints stay until the lease runs out). For tests and drills."""
        state = self.state()
        n = state.nodes[self.node_name(state, node)]
        for pid in n.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        _run(["ip", "netns", "delete", n.netns], check=False)

    def restart(self, role: str, node: str | None = None, wait: bool = True) -> int:
        """Stop and start one process the way it was first started (`nats`, `identity`, `policy`,
        `etcd`, or a node's `datapath`, `dnsproxy`, `l7proxy`, `announcer`); returns its new pid."""
        state = self.state()
        node = self.node_name(state, node) if node else None
        key = f"{node}-{role}" if node else role
        cmd = state.commands.get(key)
        if cmd is None:
            raise ClusterError(f"no {key} process in this cluster")
        old = state.nodes[node].processes.get(role) if node else state.processes.get(role)
        if old:
            _stop(old)
        pid = self._spawn(state, key, list(cmd["argv"]), dict(cmd["env"]))
        if node:
            state.nodes[node].processes[role] = pid
        else:
            state.processes[role] = pid
        state.save()
        if wait:
            log = state.dir / "logs" / f"{key}.log"
            if node:
                self._wait_node(state, state.nodes[node])
            elif role == "nats":
                host, _, port = state.nats_url.removeprefix("nats://").partition(":")
                _wait("nats-server", lambda: _nats_ready(host, int(port)), log, pid=pid)
            elif role in state.urls:
                _wait(f"the {role} service", lambda: _ready(state.urls[role]), log, pid=pid)
        return pid

    # --- status and down --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Each process of the cluster: alive, ready."""
        state = self.state()
        rows = []
        for role, pid in state.processes.items():
            url = state.urls.get(role)
            ready = _ready(url) if url else process_alive(pid)
            rows.append(
                {"component": role, "node": "", "pid": pid, "alive": process_alive(pid), "ready": ready}
            )
        for n in state.nodes.values():
            for role, pid in n.processes.items():
                urls = n.urls()
                ready = _ready(urls[role]) if role in urls else process_alive(pid)
                rows.append(
                    {
                        "component": role,
                        "node": n.name,
                        "pid": pid,
                        "alive": process_alive(pid),
                        "ready": ready,
                    }
                )
        return {"name": state.name, "state_dir": state.state_dir, "components": rows, "env": state.env()}

    def down(self) -> None:
        """Remove everything the cluster made (idempotent; tolerates half-built clusters)."""
        if not self.exists:
            return
        state = self.state()
        for n in list(state.nodes.values()):
            self._remove_node(state, n)
        for role in ("lbipam", "policy", "identity", "etcd", "nats"):
            pid = state.processes.get(role)
            if pid:
                _stop(pid)
        _run(["ip", "link", "del", state.bridge], check=False)
        shutil.rmtree(state.dir, ignore_errors=True)


def sweep_leftovers(name: str) -> bool:
    """Remove what a cluster named `name` left behind when its state directory is gone (a run killed
    before it could clean up): its node namespaces, bridge, uplinks and pinned maps. Does nothing and
    returns False while any process still runs in one of its namespaces (a live cluster)."""
    listed = _run(["ip", "netns", "list"], check=False).stdout.split("\n")
    spaces = [line.split()[0] for line in listed if line.startswith(f"{name}-")]
    for ns in spaces:
        if _run(["ip", "netns", "pids", ns], check=False).stdout.strip():
            return False
    from services.datapath import loader, maps

    for ns in spaces:
        _run(["ip", "netns", "delete", ns], check=False)
        loader.remove_pins(maps.pin_root(ns))
    links = _run(["ip", "-o", "link", "show"], check=False).stdout.split("\n")
    for line in links:
        parts = line.split(": ")
        if len(parts) > 1 and parts[1].split("@")[0].startswith(f"{name}-"):
            _run(["ip", "link", "del", parts[1].split("@")[0]], check=False)
    return True


def _forget_node(state: ClusterState, node: str, bucket: str = "nodes") -> None:
    """Delete a removed node's registry entry at once (like `kubectl delete node`): the other nodes
    drop its routes and endpoints now instead of when its lease runs out. A stopped agent does not do
    this itself, so that an agent restart never makes its node disappear from the cluster."""
    import asyncio

    from cilia.kvstore import connect

    async def forget() -> None:
        user, password = auth.load(state.creds_file).nats_users.get("admin", (None, None))
        kv = await connect(
            state.kvstore_url, state.nats_url, nats_user=user, nats_password=password, timeout=5
        )
        try:
            await kv.delete(f"{bucket}/{node}")
        finally:
            await kv.close()

    with contextlib.suppress(Exception):
        asyncio.run(forget())


def _registered_proxies(api: str, token: str) -> int:
    """How many proxies have registered with the datapath agent at `api`."""
    req = urllib.request.Request(f"{api}/v1/datapath/status", headers={"authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return len(json.loads(r.read()).get("proxies") or {})
    except (OSError, ValueError):
        return 0


def _ready_etcd(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=1) as r:
            return b"true" in r.read()
    except OSError:
        return False


def _remove_endpoints(state_file: Path) -> None:
    """Delete the pod namespaces an agent recorded (it is gone, so it cannot do it itself)."""
    if not state_file.exists():
        return
    from services.datapath.plumbing import EndpointNetwork, delete_endpoint

    try:
        doc = json.loads(state_file.read_text())
    except ValueError:
        return
    for raw in doc.get("endpoints", []):
        with contextlib.suppress(Exception):
            delete_endpoint(EndpointNetwork.from_dict(raw["network"]))
