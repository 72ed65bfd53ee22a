"""LB-IPAM's and the announcer's rules without servers: ranges and reserved addresses, conflicts,
counts, sharing compatibility, L2 candidates, BGP desired state, and the ARP codec."""

from __future__ import annotations

from typing import Any

from cilia.models.services import (
    CiliumBGPPeeringPolicy,
    CiliumL2AnnouncementPolicy,
    CiliumLoadBalancerIPPool,
    Service,
)
from services.lbipam import arp, ipam, selection


def pool(name: str, *blocks: dict[str, str], created: str = "", **spec: Any) -> ipam.Pool:
    labels = spec.pop("labels", {})
    obj = CiliumLoadBalancerIPPool.model_validate(
        {
            "apiVersion": "cilium.io/v2alpha1",
            "kind": "CiliumLoadBalancerIPPool",
            "metadata": {"name": name, "labels": labels},
            "spec": {"blocks": list(blocks), **spec},
        }
    )
    return ipam.Pool(obj, ipam.ranges_of(obj), created or name)


def service(
    name: str,
    ns: str = "default",
    ports: tuple[int, ...] = (80,),
    status_ips: tuple[str, ...] = (),
    **kw: Any,
) -> Service:
    annotations = kw.pop("annotations", {})
    labels = kw.pop("labels", {})
    spec = {
        "type": "LoadBalancer",
        "selector": kw.pop("selector", {"app": name}),
        "ports": [{"name": f"p{p}", "port": p} for p in ports],
        **kw,
    }
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": annotations},
        "spec": spec,
    }
    if status_ips:
        doc["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in status_ips]}}
    return Service.model_validate(doc)


def test_cidrs_reserve_network_and_broadcast_unless_allowed_and_ranges_reserve_nothing() -> None:
    (r,) = pool("p", {"cidr": "10.0.0.0/30"}).ranges
    assert r.size == 2 and list(ipam.free_addresses(r, set())) == ["10.0.0.1", "10.0.0.2"]
    (r,) = pool("p", {"cidr": "10.0.0.0/30"}, allowFirstLastIPs="Yes").ranges
    assert r.size == 4
    (r31,) = pool("p", {"cidr": "10.0.0.0/31"}).ranges  # too small to reserve anything
    assert r31.size == 2
    (r,) = pool("p", {"start": "10.0.0.0", "stop": "10.0.0.3"}).ranges
    assert r.size == 4
    (r,) = pool("p", {"cidr": "10.0.0.5/24"}).ranges  # masked like Go's prefix.Masked()
    assert r.text == "10.0.0.0/24"


def test_the_newer_of_two_overlapping_pools_conflicts_and_an_internal_overlap_too() -> None:
    old = pool("blue", {"cidr": "20.0.10.0/24"}, created="2024-01-01T00:00:00.000001Z")
    new = pool("red", {"cidr": "20.0.10.0/24"}, created="2024-01-01T00:00:00.000002Z")
    third = pool("green", {"cidr": "20.0.10.128/25"}, created="2024-01-01T00:00:00.000003Z")
    inner = pool(
        "self", {"cidr": "30.0.0.0/24"}, {"start": "30.0.0.5"}, created="2024-01-01T00:00:00.000000Z"
    )
    ipam.settle_conflicts([third, new, old, inner])
    assert old.conflict is None and old.allocates
    assert (
        new.conflict
        == "Pool conflicts since CIDR '20.0.10.0/24' overlaps CIDR '20.0.10.0/24' from IP Pool 'blue'"
    )
    assert third.conflict is not None and "from IP Pool 'blue'" in third.conflict
    assert inner.conflict is not None and "from IP Pool 'self'" in inner.conflict
    ipam.settle_conflicts([new, third])  # blue gone: red is the oldest now
    assert new.conflict is None and third.conflict is not None


def test_counts_leave_reserved_addresses_out_and_count_a_shared_address_once() -> None:
    p = pool("p", {"cidr": "10.0.0.0/29"}, {"start": "10.1.0.1", "stop": "10.1.0.2"})
    counts = ipam.pool_counts(p, ["10.0.0.1", "10.1.0.2", "192.168.0.1"])
    assert (counts.total, counts.used, counts.available) == (8, 2, 6)


def test_requested_address_lookup_says_why_it_cannot_be_had() -> None:
    sel = pool("sel", {"cidr": "10.0.0.0/24"}, serviceSelector={"matchLabels": {"color": "blue"}})
    off = pool("off", {"cidr": "10.9.0.0/24"}, disabled=True)
    s = service("s")
    assert ipam.find_range_of_ip([sel, off], s, "10.0.0.7").reason == "pool_selector_mismatch"
    assert ipam.find_range_of_ip([sel, off], s, "10.9.0.7").reason == "no_pool"
    blue = service("b", labels={"color": "blue"})
    assert ipam.find_range_of_ip([sel], blue, "10.0.0.7").range is not None
    assert ipam.find_range_of_ip([sel], blue, "10.0.0.255").reason == "already_allocated"
    by_ns = pool(
        "ns",
        {"cidr": "10.2.0.0/24"},
        serviceSelector={"matchLabels": {"io.kubernetes.service.namespace": "t"}},
    )
    assert by_ns.selects(service("x", ns="t")) and not by_ns.selects(service("x"))


def test_sharing_needs_one_key_other_ports_one_policy_and_permission_across_namespaces() -> None:
    key = {"lbipam.cilium.io/sharing-key": "k"}
    a = service("a", ports=(80,), annotations=key)
    assert ipam.compatible(a, service("b", ports=(443,), annotations=key)) == (True, "")
    assert ipam.compatible(a, service("b", ports=(80,), annotations=key)) == (False, "same port")
    assert ipam.compatible(a, service("b", ports=(443,))) == (False, "different sharing key")
    assert ipam.compatible(a, service("b", ports=(443,), annotations=key, externalTrafficPolicy="Local"))[
        1
    ] == ("different ExternalTrafficPolicy")
    local = dict(externalTrafficPolicy="Local", annotations=key)
    assert not ipam.compatible(
        service("a", selector={"x": "1"}, **local), service("b", ports=(443,), selector={"x": "2"}, **local)
    )[0]
    assert ipam.compatible(
        service("a", selector={"x": "1"}, **local), service("b", ports=(443,), selector={"x": "1"}, **local)
    )[0]
    other_ns = service("b", ns="o", ports=(443,), annotations=key)
    assert ipam.compatible(a, other_ns) == (False, "different and not permitted namespace")
    cross = {**key, "lbipam.cilium.io/sharing-cross-namespace": "*"}
    assert ipam.compatible(
        service("a", annotations=cross),
        service(
            "b",
            ns="o",
            ports=(443,),
            annotations={**key, "lbipam.cilium.io/sharing-cross-namespace": "default"},
        ),
    )[0]


def l2(spec: dict[str, Any], name: str = "l2") -> CiliumL2AnnouncementPolicy:
    return CiliumL2AnnouncementPolicy.model_validate(
        {
            "apiVersion": "cilium.io/v2alpha1",
            "kind": "CiliumL2AnnouncementPolicy",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def test_l2_candidates_follow_node_and_service_selectors_and_local_backends() -> None:
    s = service("s", labels={"color": "blue"}, status_ips=("10.0.0.7",), externalIPs=["10.5.0.1"])
    local = service("l", status_ips=("10.0.0.8",), externalTrafficPolicy="Local")
    other_class = service("c", status_ips=("10.0.0.9",), loadBalancerClass="io.cilium/bgp-control-plane")
    pol = l2({"nodeSelector": {"matchLabels": {"rack": "r1"}}, "loadBalancerIPs": True, "externalIPs": True})
    labels = {"kubernetes.io/hostname": "n1", "rack": "r1"}
    got = selection.l2_candidates([s, local, other_class], [pol], labels, {})
    assert list(got) == ["default/s"] and got["default/s"].addresses == ("10.0.0.7", "10.5.0.1")
    got = selection.l2_candidates([s, local], [pol], labels, {"default/l": True})
    assert set(got) == {"default/s", "default/l"}
    assert selection.l2_candidates([s], [pol], {"rack": "r2"}, {}) == {}
    lb_only = l2({"loadBalancerIPs": False, "externalIPs": False})
    assert selection.l2_candidates([s], [lb_only], labels, {}) == {}


def bgp_policy(name: str, node_selector: dict[str, Any] | None, **router: Any) -> CiliumBGPPeeringPolicy:
    spec: dict[str, Any] = {
        "virtualRouters": [
            {
                "localASN": 65001,
                "serviceSelector": {"matchLabels": {"announce": "bgp"}},
                "neighbors": [
                    {
                        "peerAddress": "10.0.0.1/32",
                        "peerASN": 65000,
                        "advertisedPathAttributes": [
                            {
                                "selectorType": "CiliumLoadBalancerIPPool",
                                "selector": {"matchLabels": {"tier": "a"}},
                                "communities": {"standard": ["65000:100"]},
                                "localPreference": 150,
                            },
                            {
                                "selectorType": "CiliumLoadBalancerIPPool",
                                "communities": {"wellKnown": ["no-export"]},
                                "localPreference": 120,
                            },
                            {"selectorType": "PodCIDR", "communities": {"large": ["1:2:3"]}},
                        ],
                    }
                ],
                **router,
            }
        ]
    }
    if node_selector is not None:
        spec["nodeSelector"] = node_selector
    return CiliumBGPPeeringPolicy.model_validate(
        {
            "apiVersion": "cilium.io/v2alpha1",
            "kind": "CiliumBGPPeeringPolicy",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def test_bgp_routes_carry_the_attributes_of_the_pool_the_address_came_from() -> None:
    pools = [
        pool("a", {"cidr": "10.0.0.0/24"}, labels={"tier": "a"}).obj,
        pool("b", {"cidr": "10.1.0.0/24"}).obj,
    ]
    svcs = [
        service("in-a", labels={"announce": "bgp"}, status_ips=("10.0.0.7",)),
        service("in-b", labels={"announce": "bgp"}, status_ips=("10.1.0.7",)),
        service("quiet", status_ips=("10.0.0.8",)),
        service("local", labels={"announce": "bgp"}, status_ips=("10.0.0.9",), externalTrafficPolicy="Local"),
    ]
    d = selection.bgp_desired(
        [bgp_policy("p", None, exportPodCIDR=True)],
        {"kubernetes.io/hostname": "n"},
        svcs,
        pools,
        {},
        "10.9.9.9",
        "10.200.1.0/24",
    )
    assert d.policy == "p" and d.error is None
    router = d.routers[65001]
    assert router.router_id == "10.9.9.9" and list(router.neighbors) == ["10.0.0.1"]
    assert set(router.routes) == {"10.0.0.7/32", "10.1.0.7/32", "10.200.1.0/24"}
    a = router.routes["10.0.0.7/32"]["10.0.0.1"]
    assert a == selection.PathAttributes(("65000:100", "65535:65281"), (), 150)  # merged, highest preference
    assert router.routes["10.1.0.7/32"]["10.0.0.1"] == selection.PathAttributes(("65535:65281",), (), 120)
    assert router.routes["10.200.1.0/24"]["10.0.0.1"] == selection.PathAttributes((), ("1:2:3",), None)
    d = selection.bgp_desired([bgp_policy("p", None)], {}, svcs, pools, {"default/local": True}, "10.9.9.9")
    assert "10.0.0.9/32" in d.routers[65001].routes


def test_two_bgp_policies_on_one_node_clear_everything_with_cilium_s_error() -> None:
    d = selection.bgp_desired(
        [bgp_policy("a", None), bgp_policy("b", {"matchLabels": {"bgp": "yes"}})],
        {"bgp": "yes"},
        [],
        [],
        {},
        "10.9.9.9",
    )
    assert d.routers == {} and d.policy is None
    assert d.error is not None and d.error.startswith(selection.ERR_MULTIPLE_POLICIES) and "a, b" in d.error
    d = selection.bgp_desired(
        [bgp_policy("a", {"matchLabels": {"bgp": "yes"}})], {"bgp": "no"}, [], [], {}, "10.9.9.9"
    )
    assert d.routers == {} and d.error is None


def test_arp_codec_round_trip_and_malformed_frames() -> None:
    mac = bytes.fromhex("020000000001")
    asker = bytes.fromhex("020000000002")
    request = arp.frame(arp.ARP_REQUEST, asker, "10.0.0.2", arp.BROADCAST, b"\x00" * 6, "10.0.0.7")
    parsed = arp.parse(request)
    assert parsed == arp.ARP(arp.ARP_REQUEST, asker, "10.0.0.2", b"\x00" * 6, "10.0.0.7")
    answer = arp.parse(arp.reply(mac, "10.0.0.7", parsed))
    assert answer == arp.ARP(arp.ARP_REPLY, mac, "10.0.0.7", asker, "10.0.0.2")
    garp = arp.gratuitous(mac, "10.0.0.7")
    assert garp[:6] == arp.BROADCAST and arp.parse(garp) == arp.ARP(
        arp.ARP_REPLY, mac, "10.0.0.7", arp.BROADCAST, "10.0.0.7"
    )
    assert arp.parse(request[:30]) is None  # truncated
    assert arp.parse(request[:12] + b"\x08\x00" + request[14:]) is None  # not ARP
    assert arp.parse(request[:20] + b"\x00\x09" + request[22:]) is None  # bad opcode
