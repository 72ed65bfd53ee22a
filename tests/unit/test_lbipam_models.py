"""Validation of Service, CiliumLoadBalancerIPPool, CiliumL2AnnouncementPolicy and
CiliumBGPPeeringPolicy: every error is the whole line a user sees (document, field path, problem)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from cilia.errors import ResourceError
from cilia.models import parse_resources
from cilia.models.services import (
    CiliumBGPPeeringPolicy,
    CiliumL2AnnouncementPolicy,
    CiliumLoadBalancerIPPool,
    Service,
    community_pair,
)

ALPHA = "cilium.io/v2alpha1"


def doc(kind: str, spec: dict[str, Any], name: str = "x", **meta: Any) -> dict[str, Any]:
    api = "v1" if kind == "Service" else ALPHA
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name, **meta}, "spec": spec}


def svc(**spec: Any) -> dict[str, Any]:
    return doc("Service", {"ports": [{"port": 80}], **spec})


def one(d: dict[str, Any]) -> Any:
    (obj,) = parse_resources(yaml.safe_dump(d))
    return obj


def line(d: dict[str, Any]) -> str:
    with pytest.raises(ResourceError) as info:
        parse_resources(yaml.safe_dump(d))
    assert len(info.value.errors) == 1, [e.line() for e in info.value.errors]
    return info.value.errors[0].line()


# --- Service ---------------------------------------------------------------------------------------


def test_a_loadbalancer_service_with_named_target_port_and_affinity_parses() -> None:
    s = one(
        svc(
            type="LoadBalancer",
            selector={"org": "empire", "version": 1},
            ports=[
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ],
            sessionAffinity="ClientIP",
            externalTrafficPolicy="Local",
        )
    )
    assert isinstance(s, Service)
    assert s.spec.selector == {"org": "empire", "version": "1"}
    assert [p.target for p in s.spec.ports] == ["http", 53]
    assert s.spec.affinity_timeout() == 10800
    assert s.key == "default/x"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"type": "NodePort"}, "Service default/x: not supported by cilia: spec.type"),
        ({"type": "Bogus"}, "Service default/x: spec.type: unsupported value 'Bogus'"),
        (
            {"ports": [{"port": 80, "protocol": "SCTP"}]},
            "Service default/x: not supported by cilia: spec.ports[0].protocol",
        ),
        (
            {"ports": [{"port": 0}]},
            "Service default/x: spec.ports[0].port: must be greater than or equal to 1",
        ),
        (
            {"ports": [{"port": 80, "targetPort": "Not_A_Name"}]},
            "Service default/x: spec.ports[0].targetPort: 'Not_A_Name' is not a port name",
        ),
        (
            {"ports": [{"port": 80, "targetPort": 70000}]},
            "Service default/x: spec.ports[0].targetPort: must be between 1 and 65535, inclusive",
        ),
        ({"ports": []}, "Service default/x: spec.ports: Required value"),
        ({"ports": [{"port": 80}, {"port": 81}]}, "Service default/x: spec.ports[0].name: Required value"),
        (
            {"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]},
            "Service default/x: spec.ports[1]: Duplicate value: 80/TCP",
        ),
        (
            {"loadBalancerIP": "10.0.0.1"},
            "Service default/x: spec.loadBalancerIP: may only be used when `type` is 'LoadBalancer'",
        ),
        (
            {"externalTrafficPolicy": "Local"},
            "Service default/x: spec.externalTrafficPolicy: may only be set for externally-accessible services",
        ),
        (
            {"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}},
            "Service default/x: spec.sessionAffinityConfig: must not be set when sessionAffinity is None",
        ),
        (
            {"clusterIP": "None"},
            "Service default/x: not supported by cilia (headless services): spec.clusterIP",
        ),
        ({"clusterIP": "1.2.3"}, "Service default/x: spec.clusterIP: '1.2.3' is not a valid IP address"),
        (
            {"ipFamilyPolicy": "RequireDualStack"},
            "Service default/x: not supported by cilia (dual stack): spec.ipFamilyPolicy",
        ),
        (
            {"healthCheckNodePort": 30000},
            "Service default/x: not supported by cilia: spec.healthCheckNodePort",
        ),
        ({"bogus": 1}, "Service default/x: unknown field: spec.bogus"),
    ],
)
def test_service_errors_name_the_document_and_field(spec: dict[str, Any], expected: str) -> None:
    assert line(svc(**spec)).startswith(expected)


def test_a_service_name_must_be_a_dns_label_and_annotations_are_checked() -> None:
    assert line({**svc(), "metadata": {"name": "9lives"}}).startswith(
        "Service default/9lives: metadata.name: a Service name must be a DNS label"
    )
    bad = svc(type="LoadBalancer")
    bad["metadata"]["annotations"] = {"lbipam.cilium.io/ips": "10.0.0.1, nope"}
    assert "'nope' is not a valid IP address" in line(bad)


def test_requested_addresses_sharing_and_selection_labels() -> None:
    d = svc(type="LoadBalancer", loadBalancerIP="10.0.0.1")
    d["metadata"].update(
        namespace="tenant",
        labels={"color": "blue"},
        annotations={
            "io.cilium/lb-ipam-ips": "10.0.0.2,10.0.0.1",
            "lbipam.cilium.io/sharing-key": "k",
            "lbipam.cilium.io/sharing-cross-namespace": "a, b",
        },
    )
    s = one(d)
    assert s.requested_ips() == ["10.0.0.1", "10.0.0.2"]
    assert s.sharing_key() == "k" and s.sharing_cross_namespace() == ["a", "b"]
    assert s.selection_labels() == {
        "color": "blue",
        "io.kubernetes.service.name": "x",
        "io.kubernetes.service.namespace": "tenant",
    }
    assert s.wants_lbipam()
    other_class = one(svc(type="LoadBalancer", loadBalancerClass="example.com/other"))
    assert not other_class.wants_lbipam()


# --- pools -----------------------------------------------------------------------------------------


def test_a_pool_with_cidr_and_range_blocks_parses() -> None:
    p = one(
        doc(
            "CiliumLoadBalancerIPPool",
            {
                "blocks": [
                    {"cidr": "10.0.10.0/24"},
                    {"cidr": "2004::0/64"},
                    {"start": "20.0.20.100", "stop": "20.0.20.200"},
                    {"start": "1.2.3.4"},
                ],
                "allowFirstLastIPs": "No",
            },
        )
    )
    assert isinstance(p, CiliumLoadBalancerIPPool)
    assert [b.text() for b in p.spec.all_blocks()] == [
        "10.0.10.0/24",
        "2004::0/64",
        "20.0.20.100-20.0.20.200",
        "1.2.3.4-1.2.3.4",
    ]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "CiliumLoadBalancerIPPool x: spec.blocks: Required value"),
        (
            {"blocks": [{"cidr": "10.0.0.0"}]},
            "CiliumLoadBalancerIPPool x: spec.blocks[0].cidr: invalid CIDR '10.0.0.0'",
        ),
        (
            {"blocks": [{"cidr": "10.0.0.0/8", "start": "10.0.0.1"}]},
            "CiliumLoadBalancerIPPool x: spec.blocks[0]: a block is either a cidr or a start/stop range",
        ),
        (
            {"blocks": [{"stop": "10.0.0.1"}]},
            "CiliumLoadBalancerIPPool x: spec.blocks[0].start: Required value",
        ),
        (
            {"blocks": [{"start": "10.0.0.9", "stop": "10.0.0.1"}]},
            "CiliumLoadBalancerIPPool x: spec.blocks[0].stop: must not be lower than start",
        ),
        (
            {"blocks": [{"start": "10.0.0.9", "stop": "::1"}]},
            "CiliumLoadBalancerIPPool x: spec.blocks[0].stop: must be of the same IP family as start",
        ),
        (
            {"blocks": [{"cidr": "10.0.0.0/8"}], "allowFirstLastIPs": "yes"},
            "CiliumLoadBalancerIPPool x: spec.allowFirstLastIPs: unsupported value 'yes'",
        ),
        (
            {"blocks": [{"cidr": "10.0.0.0/8"}], "cidrs": [{"cidr": "10.1.0.0/16"}]},
            "CiliumLoadBalancerIPPool x: spec.cidrs: may not be used together with blocks",
        ),
    ],
)
def test_pool_errors(spec: dict[str, Any], expected: str) -> None:
    assert line(doc("CiliumLoadBalancerIPPool", spec)).startswith(expected)


# --- L2 and BGP policies -------------------------------------------------------------------------


def test_l2_policy_interfaces_are_regular_expressions_matched_anywhere() -> None:
    p = one(
        doc("CiliumL2AnnouncementPolicy", {"interfaces": ["^eth[0-9]+", "bond"], "loadBalancerIPs": True})
    )
    assert isinstance(p, CiliumL2AnnouncementPolicy)
    assert p.spec.selects_interface("eth0") and p.spec.selects_interface("mybond1")
    assert not p.spec.selects_interface("lxc123")
    assert line(doc("CiliumL2AnnouncementPolicy", {"interfaces": ["eth0", "("]})).startswith(
        "CiliumL2AnnouncementPolicy x: spec.interfaces[1]: invalid regular expression '('"
    )


def bgp(neighbor: dict[str, Any], **router: Any) -> dict[str, Any]:
    return doc(
        "CiliumBGPPeeringPolicy",
        {"virtualRouters": [{"localASN": 65001, "neighbors": [{"peerASN": 65000, **neighbor}], **router}]},
    )


def test_a_bgp_peering_policy_parses_with_defaults() -> None:
    p = one(
        bgp(
            {
                "peerAddress": "10.0.0.1/32",
                "advertisedPathAttributes": [
                    {
                        "selectorType": "CiliumLoadBalancerIPPool",
                        "communities": {
                            "standard": ["65000:100", "4259840100"],
                            "wellKnown": ["no-export"],
                            "large": ["1:2:3"],
                        },
                        "localPreference": 200,
                    }
                ],
            }
        )
    )
    assert isinstance(p, CiliumBGPPeeringPolicy)
    vr = p.spec.virtualRouters[0]
    n = vr.neighbors[0]
    assert (n.address, n.peerPort, n.holdTimeSeconds, n.keepAliveTimeSeconds) == ("10.0.0.1", 179, 90, 30)
    assert vr.advertisements() == ["LoadBalancerIP"]
    assert [community_pair(c) for c in ("65000:100", "4259840100", "no-export")] == [
        "65000:100",
        "65000:100",
        "65535:65281",
    ]


@pytest.mark.parametrize(
    ("neighbor", "router", "expected"),
    [
        (
            {"peerAddress": "10.0.0.1"},
            {},
            "spec.virtualRouters[0].neighbors[0].peerAddress: invalid CIDR '10.0.0.1': must be in CIDR notation",
        ),
        (
            {"peerAddress": "10.0.0.1/32", "holdTimeSeconds": 9, "keepAliveTimeSeconds": 10},
            {},
            "spec.virtualRouters[0].neighbors[0]: KeepAliveTimeSeconds larger than HoldTimeSeconds for peer ASN:65000 IP:10.0.0.1/32",
        ),
        (
            {"peerAddress": "10.0.0.1/32", "holdTimeSeconds": 2},
            {},
            "spec.virtualRouters[0].neighbors[0].holdTimeSeconds: must be greater than or equal to 3",
        ),
        (
            {"peerAddress": "10.0.0.1/32", "authSecretRef": "s"},
            {},
            "not supported by cilia: spec.virtualRouters[0].neighbors[0].authSecretRef",
        ),
        (
            {"peerAddress": "10.0.0.1/32"},
            {"podIPPoolSelector": {}},
            "not supported by cilia: spec.virtualRouters[0].podIPPoolSelector",
        ),
        (
            {
                "peerAddress": "10.0.0.1/32",
                "advertisedPathAttributes": [
                    {"selectorType": "PodCIDR", "communities": {"standard": ["70000:1"]}}
                ],
            },
            {},
            "spec.virtualRouters[0].neighbors[0].advertisedPathAttributes[0].communities.standard[0]: '70000:1' is not a standard community",
        ),
        (
            {"peerAddress": "10.0.0.1/32"},
            {"serviceAdvertisements": ["PodIP"]},
            "spec.virtualRouters[0].serviceAdvertisements[0]: unsupported value 'PodIP'",
        ),
    ],
)
def test_bgp_errors_as_cilium_validates(
    neighbor: dict[str, Any], router: dict[str, Any], expected: str
) -> None:
    assert line(bgp(neighbor, **router)).removeprefix("CiliumBGPPeeringPolicy x: ").startswith(expected)


def test_two_virtual_routers_with_one_asn_are_refused() -> None:
    d = bgp({"peerAddress": "10.0.0.1/32"})
    d["spec"]["virtualRouters"].append(d["spec"]["virtualRouters"][0])
    assert "spec.virtualRouters[1].localASN: Duplicate value: 65001" in line(d)
