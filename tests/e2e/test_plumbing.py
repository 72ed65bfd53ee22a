"""Endpoint plumbing on real namespaces: lxc veth pairs to a node namespace, routes, forwarding, clean removal.

Every namespace here is made by a fixture or the test itself and removed even when the test fails;
packets only travel between those namespaces.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

import pytest

from services.datapath import plumbing
from services.datapath.plumbing import (
    GATEWAY,
    EndpointConflictError,
    EndpointNetwork,
    PlumbingError,
    create_endpoint,
    delete_endpoint,
    endpoint_names,
    exec_in,
    find_endpoint,
    netns_argv,
    node_addresses,
)

pytestmark = pytest.mark.root

T = TypeVar("T")
EndpointFactory = Callable[..., EndpointNetwork]
NetnsFactory = Callable[..., str]

TIMEOUT = 10.0
POLL_INTERVAL = 0.05
IP_A, IP_B, IP_C = IPv4Address("10.0.1.2"), IPv4Address("10.0.1.3"), IPv4Address("10.0.1.4")


# --- helpers ---------------------------------------------------------------------------------------


def eventually(check: Callable[[], T], *, what: str, timeout: float = TIMEOUT) -> T:
    """`check()`'s first truthy result, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s (last: {result!r})")
        time.sleep(POLL_INTERVAL)


def ip_json(*argv: str, netns: str) -> list[dict[str, Any]]:
    """`ip -j -n netns argv...` parsed (an empty list when ip prints nothing)."""
    done = subprocess.run(
        ["ip", "-j", "-n", netns, *argv], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    parsed: list[dict[str, Any]] = json.loads(done.stdout) if done.stdout.strip() else []
    return parsed


def link_names(netns: str) -> set[str]:
    return {link["ifname"] for link in ip_json("link", "show", netns=netns)}


def routes(netns: str) -> list[dict[str, Any]]:
    return ip_json("-4", "route", "show", netns=netns)


def netns_list() -> set[str]:
    done = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


def sysctl(target: EndpointNetwork | str, key: str) -> str:
    return exec_in(target, ["sysctl", "-n", key], timeout=TIMEOUT, check=True).stdout.strip()


def pings(target: EndpointNetwork | str, address: IPv4Address) -> bool:
    return exec_in(target, ["ping", "-c1", "-W1", str(address)], timeout=TIMEOUT).returncode == 0


def assert_pings(target: EndpointNetwork | str, address: IPv4Address) -> None:
    name = target.endpoint if isinstance(target, EndpointNetwork) else target
    eventually(lambda: pings(target, address), what=f"ping from {name} to {address}")


def assert_nothing_left(node: str, namespace: str, name: str, ip: IPv4Address) -> None:
    """No netns, veth end or route of the endpoint is left anywhere."""
    names = endpoint_names(namespace, name, node)
    assert names.netns not in netns_list()
    assert not {names.host_ifname, names.tmp_ifname} & link_names(node)
    assert not [r for r in routes(node) if r["dst"] == str(ip)]
    assert not [n for n in ip_json("neigh", "show", netns=node) if n["dst"] == str(ip)]


def ifindex(netns: str, ifname: str) -> int:
    index: int = ip_json("link", "show", "dev", ifname, netns=netns)[0]["ifindex"]
    return index


@pytest.fixture
def process_netns() -> Iterator[str]:
    """The netns of a process of our own (`unshare --net sleep`): a path outside /run/netns, as a container runtime gives."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "120"])
    path = f"/proc/{proc.pid}/ns/net"
    try:
        own = os.stat("/proc/self/ns/net").st_ino
        eventually(lambda: os.stat(path).st_ino != own, what="unshare to enter its own netns")
        yield path
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)


# --- tests -----------------------------------------------------------------------------------------


def test_endpoint_gets_an_lxc_veth_an_eth0_with_its_ip_and_a_route_on_the_node(
    node_netns: str, make_endpoint: EndpointFactory
) -> None:
    a = make_endpoint("default", "xwing", IP_A)

    assert re.fullmatch(r"lxc[0-9a-f]{11}", a.host_ifname) and len(a.host_ifname) <= 15
    assert re.fullmatch(r"cilia-[0-9a-f]{11}", a.netns_name or "")
    assert a.netns_path == f"/run/netns/{a.netns_name}" and a.owns_netns
    assert a.netns_name in netns_list()
    assert (a.ip, a.node_netns, a.container_ifname) == (IP_A, node_netns, "eth0")

    host = ip_json("link", "show", "dev", a.host_ifname, netns=node_netns)[0]
    assert (host["ifindex"], host["address"], host["operstate"]) == (a.host_ifindex, a.host_mac, "UP")
    pod = ip_json("addr", "show", "dev", "eth0", netns=a.netns_name or "")[0]
    assert (pod["ifindex"], pod["address"]) == (a.container_ifindex, a.container_mac)
    assert [(x["family"], x["local"], x["prefixlen"]) for x in pod["addr_info"]] == [("inet", str(IP_A), 32)]
    assert "UP" in ip_json("link", "show", "dev", "lo", netns=a.netns_name or "")[0]["flags"]

    pod_routes = {(r["dst"], r.get("gateway"), r["dev"], r.get("scope")) for r in routes(a.netns_name or "")}
    assert pod_routes == {("default", str(GATEWAY), "eth0", None), (str(GATEWAY), None, "eth0", "link")}
    [gateway] = ip_json("neigh", "show", netns=a.netns_name or "")
    assert (gateway["dst"], gateway["lladdr"], gateway["state"]) == (str(GATEWAY), a.host_mac, ["PERMANENT"])

    [route] = [r for r in routes(node_netns) if r["dst"] == str(IP_A)]
    assert (route["dev"], route["scope"]) == (a.host_ifname, "link")
    [neigh] = [n for n in ip_json("neigh", "show", netns=node_netns) if n["dst"] == str(IP_A)]
    assert (neigh["dev"], neigh["lladdr"], neigh["state"]) == (a.host_ifname, a.container_mac, ["PERMANENT"])


def test_node_forwards_ipv4_and_both_veth_ends_have_ipv6_off(
    node_netns: str, make_endpoint: EndpointFactory
) -> None:
    a = make_endpoint("default", "xwing", IP_A)

    assert sysctl(node_netns, "net.ipv4.ip_forward") == "1"
    assert sysctl(node_netns, f"net.ipv4.conf.{a.host_ifname}.rp_filter") == "0"
    assert sysctl(node_netns, f"net.ipv6.conf.{a.host_ifname}.disable_ipv6") == "1"
    assert sysctl(a, "net.ipv6.conf.eth0.disable_ipv6") == "1"
    assert ip_json("-6", "addr", "show", "dev", a.host_ifname, netns=node_netns) == []
    assert ip_json("-6", "addr", "show", "dev", "eth0", netns=a.netns_name or "") == []


def test_only_the_pods_ipv4_packets_cross_the_veth_no_arp_no_ipv6(
    node_netns: str, make_endpoint: EndpointFactory
) -> None:
    a = make_endpoint("default", "xwing", IP_A)
    make_endpoint("default", "deathstar", IP_B)

    done = exec_in(a, ["ping", "-c3", "-i0.2", "-W1", str(IP_B)], timeout=TIMEOUT)

    assert done.returncode == 0, done.stdout + done.stderr
    received = int(re.search(r"(\d+) received", done.stdout).group(1))  # type: ignore[union-attr]
    stats = ip_json("-s", "link", "show", "dev", a.host_ifname, netns=node_netns)[0]["stats64"]
    # the echo requests in, the replies ping got out, nothing else: no ARP (permanent neighbours),
    # no RS/DAD/MLD (IPv6 off). (A loaded machine may lose a reply; then ping counts one less.)
    assert (stats["rx"]["packets"], stats["tx"]["packets"]) == (3, received)


def test_pod_reaches_another_pod_through_the_node(node_netns: str, make_endpoint: EndpointFactory) -> None:
    a = make_endpoint("default", "xwing", IP_A)
    b = make_endpoint("default", "deathstar", IP_B)

    assert_pings(a, IP_B)
    assert_pings(b, IP_A)
    # the node forwarded it: one hop, TTL down by one
    reply = exec_in(a, ["ping", "-c1", "-W1", str(IP_B)], timeout=TIMEOUT).stdout
    assert "ttl=63" in reply


def test_pod_reaches_the_node_address(
    node_netns: str, node_address: IPv4Address, make_endpoint: EndpointFactory
) -> None:
    a = make_endpoint("default", "xwing", IP_A)

    assert_pings(a, node_address)
    assert_pings(node_netns, IP_A)


def test_node_addresses_are_the_node_namespaces_ipv4_addresses_without_loopback(
    node_netns: str, node_address: IPv4Address, make_endpoint: EndpointFactory
) -> None:
    make_endpoint("default", "xwing", IP_A)  # an endpoint's IP is not the node's

    assert node_addresses(node_netns) == [node_address]
    assert IPv4Address("127.0.0.1") not in node_addresses()


def test_delete_removes_the_netns_the_veth_pair_and_the_route(
    node_netns: str, make_endpoint: EndpointFactory
) -> None:
    a = make_endpoint("default", "xwing", IP_A)
    b = make_endpoint("default", "deathstar", IP_B)

    delete_endpoint(a)

    assert_nothing_left(node_netns, "default", "xwing", IP_A)
    assert link_names(node_netns) == {"lo", b.host_ifname}
    assert [r["dst"] for r in routes(node_netns)] == [str(IP_B)]
    assert_pings(b, IP_B)  # the other endpoint is untouched (and reaches itself)
    delete_endpoint(a)  # deleting again is fine
    delete_endpoint(b)
    assert link_names(node_netns) == {"lo"}
    assert routes(node_netns) == []


def test_adopting_an_existing_netns_keeps_it_after_delete(
    node_netns: str, make_netns: NetnsFactory, make_endpoint: EndpointFactory
) -> None:
    pod_ns = make_netns("ct")
    a = make_endpoint("default", "xwing", IP_A, netns_path=f"/run/netns/{pod_ns}")
    make_endpoint("default", "deathstar", IP_B)

    assert (a.netns_name, a.owns_netns) == (pod_ns, False)
    assert endpoint_names("default", "xwing", node_netns).netns not in netns_list()
    assert netns_argv(a) == ["ip", "netns", "exec", pod_ns]
    assert_pings(a, IP_B)

    delete_endpoint(a)

    assert pod_ns in netns_list()
    assert link_names(pod_ns) == {"lo"}
    assert a.host_ifname not in link_names(node_netns)


def test_adopting_a_process_netns_by_path(
    node_netns: str, node_address: IPv4Address, process_netns: str, make_endpoint: EndpointFactory
) -> None:
    before = netns_list()
    a = make_endpoint("default", "xwing", IP_A, netns_path=process_netns)

    assert (a.netns_name, a.owns_netns, a.netns_path) == (None, False, process_netns)
    assert netns_argv(a) == ["nsenter", f"--net={process_netns}"]
    assert netns_list() == before
    assert_pings(a, node_address)

    delete_endpoint(a)

    shown = exec_in(process_netns, ["ip", "-o", "link", "show"], timeout=TIMEOUT, check=True).stdout
    assert [line.split(":")[1].strip() for line in shown.splitlines()] == ["lo"]
    assert a.host_ifname not in link_names(node_netns)


def test_restore_after_restart_finds_the_same_interfaces_without_recreating_them(
    node_netns: str, make_endpoint: EndpointFactory
) -> None:
    a = make_endpoint("default", "xwing", IP_A)
    b = make_endpoint("default", "deathstar", IP_B)
    stored = json.dumps(a.to_dict())  # what the agent recorded before it restarted

    restored = find_endpoint(EndpointNetwork.from_dict(json.loads(stored)))

    assert restored == a
    assert ifindex(node_netns, a.host_ifname) == a.host_ifindex
    again = create_endpoint("default", "xwing", IP_A, node_netns=node_netns)  # create is idempotent too
    assert again == a
    assert ifindex(node_netns, a.host_ifname) == a.host_ifindex
    assert_pings(a, IP_B)
    assert find_endpoint(b) == b


def test_restore_reports_plumbing_that_changed_or_went_away(
    node_netns: str, make_endpoint: EndpointFactory
) -> None:
    a = make_endpoint("default", "xwing", IP_A)

    assert (
        find_endpoint(EndpointNetwork.from_dict({**a.to_dict(), "host_ifindex": a.host_ifindex + 100}))
        is None
    )
    assert find_endpoint(EndpointNetwork.from_dict({**a.to_dict(), "ip": str(IP_C)})) is None

    subprocess.run(["ip", "-n", node_netns, "link", "del", a.host_ifname], check=True, timeout=TIMEOUT)
    assert find_endpoint(a) is None

    # plumbing it again reuses the namespace and makes a new veth pair
    again = make_endpoint("default", "xwing", IP_A)
    assert again.netns_name == a.netns_name
    assert_pings(again, IP_A)
    assert find_endpoint(again) == again


def test_an_ip_that_another_endpoint_has_fails_and_leaves_nothing_behind(
    node_netns: str, make_endpoint: EndpointFactory
) -> None:
    a = make_endpoint("default", "xwing", IP_A)
    b = make_endpoint("default", "deathstar", IP_B)
    links_before, routes_before = link_names(node_netns), routes(node_netns)

    with pytest.raises(EndpointConflictError, match=r"10\.0\.1\.2 is already routed in node netns"):
        make_endpoint("default", "tiefighter", IP_A)

    names = endpoint_names("default", "tiefighter", node_netns)
    assert names.netns not in netns_list()
    assert link_names(node_netns) == links_before
    assert routes(node_netns) == routes_before
    assert_pings(a, IP_B)
    assert_pings(b, IP_A)


def test_a_failure_midway_removes_what_was_made(
    node_netns: str, make_endpoint: EndpointFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = plumbing._write_sysctls

    def fail_in_pod(path: str | None, values: Mapping[str, str]) -> None:
        if any("/eth0/" in key for key in values):  # after the veth exists and has moved into the pod
            raise OSError(errno.EIO, "injected failure")
        real(path, values)

    monkeypatch.setattr(plumbing, "_write_sysctls", fail_in_pod)
    with pytest.raises(
        PlumbingError, match=r"endpoint default/xwing: configure eth0 in the pod: injected failure"
    ):
        make_endpoint("default", "xwing", IP_A)

    assert_nothing_left(node_netns, "default", "xwing", IP_A)
    assert link_names(node_netns) == {"lo"}


def test_the_same_endpoint_with_another_ip_is_a_conflict(
    node_netns: str, make_endpoint: EndpointFactory
) -> None:
    a = make_endpoint("default", "xwing", IP_A)

    with pytest.raises(EndpointConflictError, match=r"default/xwing is already plumbed with IP 10\.0\.1\.2"):
        create_endpoint("default", "xwing", IP_C, node_netns=node_netns)

    assert find_endpoint(a) == a


def test_an_adopted_netns_that_has_an_eth0_is_refused_and_kept(
    node_netns: str, make_netns: NetnsFactory, make_endpoint: EndpointFactory
) -> None:
    pod_ns = make_netns("ct")
    subprocess.run(
        ["ip", "-n", pod_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
        check=True,
        timeout=TIMEOUT,
    )

    with pytest.raises(PlumbingError, match=r"already has an interface eth0"):
        make_endpoint("default", "xwing", IP_A, netns_path=f"/run/netns/{pod_ns}")

    assert link_names(pod_ns) == {"lo", "eth0", "eth1"}
    assert link_names(node_netns) == {"lo"}


def test_bad_places_are_clear_errors_and_make_nothing(node_netns: str, tmp_path: Path) -> None:
    not_a_netns = tmp_path / "not-a-netns"
    not_a_netns.write_text("")
    before = netns_list()

    with pytest.raises(PlumbingError, match=r"is not a network namespace"):
        create_endpoint("default", "xwing", IP_A, node_netns=node_netns, netns_path=str(not_a_netns))
    with pytest.raises(PlumbingError, match=r"node netns 'ct-no-such-node' does not exist"):
        create_endpoint("default", "xwing", IP_A, node_netns="ct-no-such-node")
    with pytest.raises(PlumbingError, match=r"'10\.0\.1' is not an IPv4 address"):
        create_endpoint("default", "xwing", "10.0.1", node_netns=node_netns)
    with pytest.raises(PlumbingError, match=r"netns cilia-nope does not exist"):
        exec_in("cilia-nope", ["true"])

    assert netns_list() == before
    assert link_names(node_netns) == {"lo"}


def test_exec_in_runs_a_command_in_the_pod(node_netns: str, make_endpoint: EndpointFactory) -> None:
    a = make_endpoint("default", "xwing", IP_A)

    shown = exec_in(a, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"], timeout=TIMEOUT)
    assert shown.returncode == 0 and f"inet {IP_A}/32" in shown.stdout
    by_name = exec_in(a.netns_name or "", ["cat", "/proc/net/dev"], timeout=TIMEOUT, check=True)
    assert "eth0" in by_name.stdout
    failed = exec_in(a, ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=TIMEOUT)
    assert (failed.returncode, failed.stdout, failed.stderr) == (3, "out\n", "err\n")
    assert exec_in(a, ["cat"], input="hello", timeout=TIMEOUT).stdout == "hello"


def test_names_are_stable_per_node_and_fit_in_ifnamsiz() -> None:
    one = endpoint_names("default", "xwing", "node-1")
    assert one == endpoint_names("default", "xwing", "node-1")
    assert one != endpoint_names("default", "xwing", "node-2")
    assert one != endpoint_names("default", "tiefighter", "node-1")
    assert all(len(n) <= 15 for n in (one.host_ifname, one.tmp_ifname))
    with pytest.raises(PlumbingError, match=r"need a namespace and a name"):
        endpoint_names("", "xwing")


async def test_endpoints_plumbed_concurrently_from_asyncio_all_work(
    node_netns: str, make_endpoint: EndpointFactory
) -> None:
    ips = [IPv4Address(f"10.0.1.{10 + i}") for i in range(4)]

    made = await asyncio.gather(
        *(asyncio.to_thread(make_endpoint, "default", f"pod-{i}", ip) for i, ip in enumerate(ips))
    )

    assert len({m.host_ifname for m in made}) == len({m.netns_name for m in made}) == 4
    for source in made:
        for ip in ips:
            assert_pings(source, ip)
    await asyncio.gather(*(asyncio.to_thread(delete_endpoint, m) for m in made))
    assert link_names(node_netns) == {"lo"}
