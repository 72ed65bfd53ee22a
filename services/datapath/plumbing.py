"""Endpoint plumbing: an endpoint's network namespace and its veth pair to the node, as Cilium's `lxc*` devices.

This is the CNI-ADD part of the datapath agent, without BPF: it makes the interfaces the programs attach
to. Every public function here blocks (netlink, subprocesses); the agent calls them through
`asyncio.to_thread`.

How a pod reaches the world: the pod has `ip/32` on `eth0`, a link-scope route to the gateway
169.254.1.1 and a default route via it. Nothing answers ARP for 169.254.1.1: the pod has a *permanent*
neighbour entry mapping it to the host veth's MAC, and the node has a permanent entry mapping the pod's
IP to the pod's MAC on the `lxc` device. So no ARP ever crosses the veth (the eBPF programs see only
IPv4), it does not depend on the node having a route to 169.254.1.1 (which `proxy_arp` would need),
and, with IPv6 disabled on both ends before they come up, no neighbour discovery either.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute, NetlinkError

from cilia.errors import CiliaError

log = logging.getLogger(__name__)

T = TypeVar("T")

GATEWAY = IPv4Address("169.254.1.1")  # the pod's default gateway, as Calico and Cilium's ENI mode use
CONTAINER_IFNAME = "eth0"
HOST_IFNAME_PREFIX = "lxc"  # + 11 hex digits: 14 characters, within IFNAMSIZ (15)
TMP_IFNAME_PREFIX = "tmp"  # the container side's name until it is in the pod's namespace
NETNS_PREFIX = "cilia-"
NETNS_DIR = Path("/run/netns")  # where `ip netns` keeps named namespaces
HASH_LEN = 11
COMMAND_TIMEOUT = 30.0  # seconds for `ip netns add/delete`

_CLONE_NEWNET = 0x40000000
_NUD_PERMANENT = 0x80
_RT_SCOPE_LINK = 253
_RT_SCOPE_HOST = 254
_GONE = (errno.ENODEV, errno.ESRCH, errno.ENOENT)  # netlink: the thing to delete is not there

_libc = ctypes.CDLL(None, use_errno=True)


class PlumbingError(CiliaError):
    """Creating, finding or deleting an endpoint's interfaces failed; the message names the endpoint and the step."""


class EndpointConflictError(PlumbingError):
    """The endpoint, or its IP, is already plumbed differently on this node."""


@dataclass(frozen=True, slots=True)
class EndpointNames:
    """The names one endpoint's plumbing uses: derived from node, namespace and name, so they are stable."""

    netns: str  # cilia-<hash>, under /run/netns
    host_ifname: str  # lxc<hash>, in the node's namespace
    tmp_ifname: str  # tmp<hash>, the container side before it moves


@dataclass(frozen=True, slots=True)
class EndpointNetwork:
    """What an endpoint's plumbing is: enough to attach programs to it, find it again after a restart, and delete it."""

    namespace: str
    name: str
    ip: IPv4Address
    netns_path: str  # the pod's network namespace
    netns_name: str | None  # its name under /run/netns, or None for a path elsewhere (/proc/<pid>/ns/net)
    owns_netns: bool  # created by us: deleted with the endpoint
    node_netns: str | None  # the node's namespace name; None: the agent's own namespace
    host_ifname: str
    host_ifindex: int
    host_mac: str
    container_ifname: str
    container_ifindex: int
    container_mac: str

    @property
    def endpoint(self) -> str:
        """`namespace/name`."""
        return f"{self.namespace}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (the agent stores it with the endpoint)."""
        record = asdict(self)
        record["ip"] = str(self.ip)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> EndpointNetwork:
        """The record `to_dict` wrote."""
        try:
            return cls(**{**record, "ip": IPv4Address(record["ip"])})
        except (KeyError, TypeError, ValueError) as err:
            raise PlumbingError(f"invalid endpoint network record: {err}") from None


def endpoint_names(namespace: str, name: str, node_netns: str | None = None) -> EndpointNames:
    """The stable names of an endpoint's netns and veth ends.

    The node is part of the hash because all nodes of a one-machine cluster share /run/netns: the same
    `namespace/name` on two nodes must not get the same netns.
    """
    if not namespace or not name or "/" in namespace or "/" in name:
        raise PlumbingError(f"invalid endpoint name {namespace!r}/{name!r}: need a namespace and a name")
    key = f"{node_netns or ''}|{namespace}/{name}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:HASH_LEN]
    return EndpointNames(
        netns=f"{NETNS_PREFIX}{digest}",
        host_ifname=f"{HOST_IFNAME_PREFIX}{digest}",
        tmp_ifname=f"{TMP_IFNAME_PREFIX}{digest}",
    )


# --- namespaces -------------------------------------------------------------------------------------


def _named_netns_path(name: str) -> str:
    return str(NETNS_DIR / name)


def _node_path(node_netns: str | None) -> str | None:
    """The node namespace's path (None: our own), which must exist."""
    if node_netns is None:
        return None
    path = _named_netns_path(node_netns)
    if not os.path.exists(path):
        raise PlumbingError(f"node netns {node_netns!r} does not exist ({path})")
    return path


def _in_netns(path: str | None, fn: Callable[[], T]) -> T:
    """Run `fn` in the network namespace at `path` (None: here), on a thread of its own.

    setns(CLONE_NEWNET) moves only the calling thread, so a short-lived thread keeps the caller's
    thread (an asyncio executor's, say) where it was. Sockets opened there stay in that namespace.
    """
    if path is None:
        return fn()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            outcome["error"] = PlumbingError(f"cannot open netns {path}: {err.strerror}")
            return
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                outcome["error"] = PlumbingError(
                    f"{path} is not a network namespace ({os.strerror(code)})"
                    if code == errno.EINVAL
                    else f"cannot enter netns {path}: {os.strerror(code)}"
                )
                return
        finally:
            os.close(fd)
        try:
            outcome["result"] = fn()
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=run, name="cilia-netns")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    result: T = outcome["result"]
    return result


@contextmanager
def _netlink(path: str | None) -> Iterator[Any]:
    """An rtnetlink socket (pyroute2 IPRoute) bound to the namespace at `path`."""
    ipr = _in_netns(path, IPRoute)
    try:
        yield ipr
    finally:
        ipr.close()


def _write_sysctls(path: str | None, values: Mapping[str, str]) -> None:
    """Write `/proc/sys` keys (`net/ipv4/ip_forward`) in the namespace at `path`; IPv6 keys are skipped if IPv6 is off."""

    def write() -> None:
        for key, value in values.items():
            try:
                Path("/proc/sys", key).write_text(value)
            except FileNotFoundError:
                if not key.startswith("net/ipv6/"):
                    raise

    _in_netns(path, write)


def _run(argv: Sequence[str]) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    if done.returncode != 0:
        raise PlumbingError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit code {done.returncode}'}")


def _create_netns(name: str) -> None:
    # `ip netns add` rather than pyroute2.netns.create: that one forks the (threaded) agent.
    _run(["ip", "netns", "add", name])


def _delete_netns(name: str) -> None:
    if os.path.exists(_named_netns_path(name)):
        _run(["ip", "netns", "delete", name])


# --- netlink helpers -------------------------------------------------------------------------------


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _link(ipr: Any, index: int) -> Any:
    return ipr.get_links(index)[0]


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def _ipv4_addresses(ipr: Any, index: int) -> list[IPv4Address]:
    return [IPv4Address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=socket.AF_INET, index=index)]


def _delete_link(path: str | None, ifname: str) -> bool:
    """Delete the interface `ifname` in the namespace at `path` if it is there; True if it was."""
    with _netlink(path) as ipr:
        index = _index(ipr, ifname)
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except NetlinkError as err:
            if err.code not in _GONE:
                raise
            return False
        return True


def _undo(what: str, fn: Callable[..., object], *args: Any) -> Callable[[], None]:
    """An undo step that logs instead of raising, so that the original error is the one the caller sees."""

    def run() -> None:
        try:
            fn(*args)
        except Exception as err:
            log.warning("event=endpoint-undo-failed step=%s error=%r", what, err)

    return run


# --- endpoints -------------------------------------------------------------------------------------


def create_endpoint(
    namespace: str,
    name: str,
    ip: IPv4Address | str,
    node_netns: str | None = None,
    netns_path: str | None = None,
    node_key: str | None = None,
) -> EndpointNetwork:
    """Plumb an endpoint: its netns (or the existing one at `netns_path`), a veth pair to the node, addresses and routes.

    `node_key` names the node in the endpoint's interface names when the agent runs inside the node's
    namespace (no `node_netns`), so two nodes of one machine never pick the same names.

    Idempotent: an endpoint already plumbed with the same IP is returned as it is (same ifindex). On any
    failure everything this call made is removed again, and a PlumbingError says which step failed.
    """
    try:
        address = IPv4Address(ip)
    except ValueError:
        raise PlumbingError(f"endpoint {namespace}/{name}: {ip!r} is not an IPv4 address") from None
    names = endpoint_names(namespace, name, node_netns or node_key)
    node_path = _node_path(node_netns)
    owns_netns = netns_path is None
    pod_path = _named_netns_path(names.netns) if netns_path is None else netns_path
    wanted = EndpointNetwork(
        namespace=namespace,
        name=name,
        ip=address,
        netns_path=pod_path,
        netns_name=names.netns if netns_path is None else _netns_name_of(netns_path),
        owns_netns=owns_netns,
        node_netns=node_netns,
        host_ifname=names.host_ifname,
        host_ifindex=0,
        host_mac="",
        container_ifname=CONTAINER_IFNAME,
        container_ifindex=0,
        container_mac="",
    )
    endpoint = wanted.endpoint

    existing = _inspect(wanted, node_path, match_ip=False)
    if existing is not None:
        if existing.ip == address:
            log.info(
                "event=endpoint-exists endpoint=%s ip=%s host_ifname=%s", endpoint, address, names.host_ifname
            )
            return existing
        raise EndpointConflictError(
            f"endpoint {endpoint} is already plumbed with IP {existing.ip}, not {address}: delete it first"
        )

    with ExitStack() as undo:
        if owns_netns and not os.path.exists(pod_path):
            _create_netns(names.netns)
            undo.callback(_undo("delete netns", _delete_netns, names.netns))
        else:
            _in_netns(pod_path, lambda: None)  # fails with a clear error if it is not a namespace
        # A host veth of ours without a whole endpoint behind it is left over from a crash: start again.
        if _delete_link(node_path, names.host_ifname):
            log.info(
                "event=endpoint-stale-veth-removed endpoint=%s host_ifname=%s", endpoint, names.host_ifname
            )
        record = _plumb(wanted, names.tmp_ifname, node_path, undo)
        undo.pop_all()
    log.info(
        "event=endpoint-plumbed endpoint=%s ip=%s netns=%s host_ifname=%s host_ifindex=%d node=%s",
        endpoint,
        address,
        pod_path,
        record.host_ifname,
        record.host_ifindex,
        node_netns or "-",
    )
    return record


def _netns_name_of(path: str) -> str | None:
    parent = os.path.realpath(os.path.dirname(path))
    return os.path.basename(path) if parent == os.path.realpath(NETNS_DIR) else None


@contextmanager
def _step(endpoint: str, what: str) -> Iterator[None]:
    """Name the step that failed: netlink and OS errors become one PlumbingError line."""
    try:
        yield
    except NetlinkError as err:
        reason = err.args[1] if len(err.args) > 1 else os.strerror(err.code)
        raise PlumbingError(f"endpoint {endpoint}: {what}: {reason}") from err
    except OSError as err:
        raise PlumbingError(f"endpoint {endpoint}: {what}: {err.strerror or err}") from err


def _plumb(
    wanted: EndpointNetwork, tmp_ifname: str, node_path: str | None, undo: ExitStack
) -> EndpointNetwork:
    """The netlink and sysctl steps of create_endpoint; each step that makes something registers its undo."""
    endpoint, ip, host_ifname, pod_path = wanted.endpoint, wanted.ip, wanted.host_ifname, wanted.netns_path
    with _netlink(node_path) as node, _netlink(pod_path) as pod:
        if _index(pod, CONTAINER_IFNAME) is not None:
            raise PlumbingError(
                f"endpoint {endpoint}: netns {pod_path} already has an interface {CONTAINER_IFNAME}"
            )
        with _step(endpoint, "enable IPv4 forwarding on the node"):
            _write_sysctls(node_path, {"net/ipv4/ip_forward": "1"})

        with _step(endpoint, f"create veth {host_ifname}"):
            _delete_link(node_path, tmp_ifname)  # a leftover of a crash between add and move
            node.link("add", ifname=host_ifname, kind="veth", peer=tmp_ifname)
            # Removing one end of a veth pair removes the other, wherever it is: one undo covers both.
            undo.callback(_undo("delete veth", _delete_link, node_path, host_ifname))
            host_index = _index(node, host_ifname)
            tmp_index = _index(node, tmp_ifname)
            if host_index is None or tmp_index is None:
                raise PlumbingError(f"endpoint {endpoint}: veth {host_ifname} vanished after it was made")
            host_mac = str(_link(node, host_index).get_attr("IFLA_ADDRESS"))
        with _step(endpoint, f"configure {host_ifname}"):
            # IPv6 off before the device is up, so that it never sends a router solicitation or DAD probe.
            _write_sysctls(
                node_path,
                {
                    f"net/ipv6/conf/{host_ifname}/disable_ipv6": "1",
                    f"net/ipv4/conf/{host_ifname}/rp_filter": "0",
                },
            )

        with _step(endpoint, f"move {tmp_ifname} into netns {pod_path}"):
            fd = os.open(pod_path, os.O_RDONLY)
            try:
                node.link("set", index=tmp_index, net_ns_fd=fd)
            finally:
                os.close(fd)
            pod_index = _index(pod, tmp_ifname)
            if pod_index is None:
                raise PlumbingError(f"endpoint {endpoint}: {tmp_ifname} did not arrive in netns {pod_path}")
        with _step(endpoint, f"configure {CONTAINER_IFNAME} in the pod"):
            pod.link("set", index=pod_index, ifname=CONTAINER_IFNAME)
            _write_sysctls(pod_path, {f"net/ipv6/conf/{CONTAINER_IFNAME}/disable_ipv6": "1"})
            container_mac = str(_link(pod, pod_index).get_attr("IFLA_ADDRESS"))
            lo = _index(pod, "lo")
            if lo is not None:
                pod.link("set", index=lo, state="up")
            pod.addr("add", index=pod_index, address=str(ip), prefixlen=32)
            pod.link("set", index=pod_index, state="up")
            pod.neigh("add", dst=str(GATEWAY), lladdr=host_mac, ifindex=pod_index, state=_NUD_PERMANENT)
            pod.route("add", dst=f"{GATEWAY}/32", oif=pod_index, scope=_RT_SCOPE_LINK)
            pod.route("add", dst="0.0.0.0/0", gateway=str(GATEWAY), oif=pod_index)

        with _step(endpoint, f"bring up {host_ifname}"):
            node.link("set", index=host_index, state="up")
            node.neigh("add", dst=str(ip), lladdr=container_mac, ifindex=host_index, state=_NUD_PERMANENT)
        with _step(endpoint, f"add route {ip}/32 dev {host_ifname}"):
            try:
                node.route("add", dst=f"{ip}/32", oif=host_index, scope=_RT_SCOPE_LINK)
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise
                raise EndpointConflictError(
                    f"endpoint {endpoint}: {ip} is already routed in node netns {wanted.node_netns or '(host)'}"
                    " (another endpoint has this IP)"
                ) from None
    return replace(
        wanted,
        host_ifindex=host_index,
        host_mac=host_mac,
        container_ifindex=pod_index,
        container_mac=container_mac,
    )


def _inspect(wanted: EndpointNetwork, node_path: str | None, *, match_ip: bool) -> EndpointNetwork | None:
    """The endpoint's plumbing as it is now, or None unless it is whole (veth pair across, IP, route).

    With `match_ip` the pod must have `wanted.ip`; without, the record carries the IP the pod has.
    """
    if not os.path.exists(wanted.netns_path):
        return None
    with ExitStack() as stack:
        node = stack.enter_context(_netlink(node_path))
        host_index = _index(node, wanted.host_ifname)
        if host_index is None:
            return None
        host = _link(node, host_index)
        if _kind(host) != "veth":
            return None
        try:
            pod = stack.enter_context(_netlink(wanted.netns_path))
        except PlumbingError:
            return None  # the path is there but is no namespace any more
        pod_index = _index(pod, wanted.container_ifname)
        if pod_index is None or pod_index != host.get_attr("IFLA_LINK"):
            return None  # no eth0, or an eth0 that is not our veth's peer
        addresses = _ipv4_addresses(pod, pod_index)
        candidates = [a for a in addresses if a == wanted.ip] if match_ip else addresses
        if not candidates:
            return None
        ip = candidates[0]
        routes = node.get_routes(family=socket.AF_INET, dst=str(ip), dst_len=32, oif=host_index)
        if not any(r.get_attr("RTA_DST") == str(ip) and r["dst_len"] == 32 for r in routes):
            return None
        return replace(
            wanted,
            ip=ip,
            host_ifindex=host_index,
            host_mac=str(host.get_attr("IFLA_ADDRESS")),
            container_ifindex=pod_index,
            container_mac=str(_link(pod, pod_index).get_attr("IFLA_ADDRESS")),
        )


def find_endpoint(recorded: EndpointNetwork) -> EndpointNetwork | None:
    """After an agent restart: the recorded endpoint, refreshed, if its plumbing is still whole and unchanged.

    None if the netns, the veth pair, the IP or the route is gone, or if the host veth is not the one
    recorded (another ifindex): the caller then deletes the rest and plumbs the endpoint again.
    """
    try:
        node_path = _node_path(recorded.node_netns)
    except PlumbingError:
        return None
    found = _inspect(recorded, node_path, match_ip=True)
    if found is None or found.host_ifindex != recorded.host_ifindex:
        return None
    return found


def delete_endpoint(net: EndpointNetwork) -> None:
    """Remove an endpoint's plumbing: the route, the veth pair (with its neighbour entries), and the netns if ours.

    Parts already gone are fine; a node netns that is gone took the host veth with it.
    """
    node_gone = net.node_netns is not None and not os.path.exists(_named_netns_path(net.node_netns))
    if not node_gone:
        with _netlink(_node_path(net.node_netns)) as node:
            index = _index(node, net.host_ifname)
            if index is not None:
                try:
                    node.route("del", dst=f"{net.ip}/32", oif=index, scope=_RT_SCOPE_LINK)
                except NetlinkError as err:  # the link's removal takes its routes anyway
                    if err.code not in _GONE:
                        log.warning(
                            "event=endpoint-route-delete-failed endpoint=%s error=%r", net.endpoint, err
                        )
                with _step(net.endpoint, f"delete {net.host_ifname}"):
                    try:
                        node.link("del", index=index)
                    except NetlinkError as err:
                        if err.code not in _GONE:
                            raise
    if net.owns_netns and net.netns_name:
        _delete_netns(net.netns_name)
    log.info(
        "event=endpoint-unplumbed endpoint=%s ip=%s host_ifname=%s", net.endpoint, net.ip, net.host_ifname
    )


# --- running things in a pod, node addresses ---------------------------------------------------------


def netns_argv(target: EndpointNetwork | str) -> list[str]:
    """The argv prefix that runs a command in the endpoint's netns (a name under /run/netns, or a path)."""
    if isinstance(target, EndpointNetwork):
        name, path = target.netns_name, target.netns_path
    elif "/" in target:
        name, path = _netns_name_of(target), target
    else:
        name, path = target, _named_netns_path(target)
    if not os.path.exists(path):
        raise PlumbingError(f"netns {name or path} does not exist")
    # `ip netns exec` also gives the command the namespace's /sys and /etc/netns/<name>; nsenter for other paths.
    return ["ip", "netns", "exec", name] if name else ["nsenter", f"--net={path}"]


def exec_in(
    target: EndpointNetwork | str,
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    input: str | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` in the endpoint's netns (like `ip netns exec`) and return its exit code and captured output."""
    if not argv:
        raise PlumbingError("nothing to run: give a command")
    return subprocess.run(
        [*netns_argv(target), *argv],
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        check=check,
    )


def node_addresses(node_netns: str | None = None) -> list[IPv4Address]:
    """The node namespace's IPv4 addresses (loopback-scope ones excluded), sorted: the datapath's `host` identity."""
    with _netlink(_node_path(node_netns)) as ipr:
        found = {
            IPv4Address(a.get_attr("IFA_ADDRESS"))
            for a in ipr.get_addr(family=socket.AF_INET)
            if a["scope"] != _RT_SCOPE_HOST
        }
    return sorted(found)


def device_of(address: str, node_netns: str | None = None) -> str | None:
    """The name of the node's device that holds `address` (None: no such device, or loopback)."""
    with _netlink(_node_path(node_netns)) as ipr:
        for a in ipr.get_addr(family=socket.AF_INET):
            if a.get_attr("IFA_ADDRESS") == address:
                link = _link(ipr, a["index"])
                name = link.get_attr("IFLA_IFNAME") if link is not None else None
                return None if name == "lo" else name
    return None
