"""Flows: building them from datapath events, Hubble's text and JSON formats, and flow filters.

Expected lines are copied from `hubble observe` output (shared/seeds/002 and 004); the JSON shapes
from Hubble's `-o json` output in shared/seeds/004.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from cilia import flows
from cilia.flows import (
    DNS,
    HTTP,
    CiliumEventType,
    Endpoint,
    Flow,
    FlowError,
    FlowFilter,
    FlowPolicy,
    IPHeader,
    Layer4,
    Layer7,
    TCPHeader,
    UDPHeader,
    flow_to_dict,
    format_dict,
    format_line,
    l7_summary,
    parse_json,
    parse_rfc3339,
    parse_time,
    rfc3339_nano,
    to_json_line,
)
from services.datapath import eventtypes as ev
from services.datapath.eventtypes import RawEvent
from services.datapath.flowbuild import EndpointInfo, StaticFlowContext, build_flow

# --- a small cluster: Star Wars, the FQDN lab, BookInfo ----------------------------------------

K8S = "k8s:io.kubernetes.pod.namespace=default"
XWING = EndpointInfo("default", "xwing", 63406, ("k8s:class=xwing", "k8s:org=alliance", K8S), "10.0.1.20", 0)
TIEFIGHTER = EndpointInfo(
    "default", "tiefighter", 25698, ("k8s:class=tiefighter", "k8s:org=empire", K8S), "10.0.1.30", 312
)
DEATHSTAR = EndpointInfo(
    "default",
    "deathstar-b4b8ccfb5-f75xw",
    6822,
    ("k8s:class=deathstar", "k8s:org=empire", K8S),
    "10.0.1.10",
    1717,
    "lxc8ad1e2f7",
    17,
)
CLIENT = EndpointInfo("default", "internal-client", 23217, ("k8s:app=internal-client", K8S), "10.0.1.40", 450)
CIDR_ID = 16777219
DENY_COOKIE, ALLOW_COOKIE, FQDN_COOKIE = 7, 8, 9
RULE1 = FlowPolicy(
    name="rule1",
    namespace="default",
    kind="CiliumNetworkPolicy",
    rule="ingress[0]",
    reason="default/rule1 ingress[0]",
)


def ctx(**kw: Any) -> StaticFlowContext:
    base: dict[str, Any] = {
        "node_name": "kind-kind/kind-worker",
        "endpoints": (XWING, TIEFIGHTER, DEATHSTAR, CLIENT),
        "identities": {CIDR_ID: ["cidr:34.117.118.44/32", "reserved:world"]},
        "names": {"34.117.118.44": ["ifconfig.me"], "151.101.3.5": [], "151.101.67.5": ["cnn.com"]},
        "rules": {
            ALLOW_COOKIE: RULE1,
            DENY_COOKIE: FlowPolicy(
                name="no-xwing",
                namespace="default",
                kind="CiliumNetworkPolicy",
                rule="ingressDeny[0]",
                reason="deny: default/no-xwing ingressDeny[0]",
            ),
            FQDN_COOKIE: FlowPolicy(
                name="from-internal-client-to-fqdn",
                namespace="default",
                kind="CiliumNetworkPolicy",
                rule="egress[1]",
                reason="default/from-internal-client-to-fqdn egress[1]",
            ),
        },
        "interfaces": {17: "lxc8ad1e2f7", 6: "cilium_vxlan"},
    }
    base.update(kw)
    return StaticFlowContext(**base)


def at(month: int, day: int, hms: str, ms: int, year: int = 2024) -> int:
    """A wall-clock time in ns; StaticFlowContext's offset is 0, so it is also the event's ts_ns."""
    h, m, s = (int(x) for x in hms.split(":"))
    return int(datetime(year, month, day, h, m, s, tzinfo=UTC).timestamp()) * 10**9 + ms * 10**6


def raw(**kw: Any) -> RawEvent:
    fields: dict[str, Any] = {
        "ts_ns": at(4, 5, "21:03:18", 803),
        "type": ev.EVENT_TRACE,
        "subtype": 0,
        "direction": ev.DIR_INGRESS,
        "verdict": ev.VERDICT_FORWARDED,
        "proto": 6,
        "tcp_flags": ev.TCP_SYN,
        "match_type": 0,
        "is_reply": 0,
        "ifindex": 0,
        "src_ep": 0,
        "dst_ep": 0,
        "src_identity": 0,
        "dst_identity": 0,
        "saddr": "0.0.0.0",
        "daddr": "0.0.0.0",
        "sport": 0,
        "dport": 0,
        "cookie": 0,
        "proxy_port": 0,
        "pkt_len": 60,
    }
    fields.update(kw)
    return RawEvent(**fields)


def xwing_to_deathstar(**kw: Any) -> RawEvent:
    base: dict[str, Any] = {
        "src_identity": XWING.identity,
        "dst_identity": DEATHSTAR.identity,
        "dst_ep": DEATHSTAR.id,
        "saddr": XWING.ip,
        "daddr": DEATHSTAR.ip,
        "sport": 45706,
        "dport": 80,
    }
    base.update(kw)
    return raw(**base)


def client_egress(daddr: str, dst_identity: int, **kw: Any) -> RawEvent:
    base: dict[str, Any] = {
        "ts_ns": at(4, 28, "01:04:16", 656),
        "direction": ev.DIR_EGRESS,
        "src_ep": CLIENT.id,
        "src_identity": CLIENT.identity,
        "dst_identity": dst_identity,
        "saddr": CLIENT.ip,
        "daddr": daddr,
        "sport": 54006,
        "dport": 80,
    }
    base.update(kw)
    return raw(**base)


# --- compact lines: policy verdicts ----------------------------------------------------------


def test_denied_ingress_verdict_prints_like_hubble() -> None:
    flow = build_flow(
        xwing_to_deathstar(type=ev.EVENT_POLICY_VERDICT, verdict=ev.VERDICT_DROPPED, is_reply=2), ctx()
    )
    assert format_line(flow) == (
        "Apr  5 21:03:18.803: default/xwing:45706 (ID:63406) <> default/deathstar-b4b8ccfb5-f75xw:80 (ID:6822) "
        "policy-verdict:none INGRESS DENIED (TCP Flags: SYN)"
    )
    assert flow.verdict == "DROPPED"
    assert flow.drop_reason == 133 and flow.drop_reason_desc == "POLICY_DENIED"
    assert flow.is_reply is None
    assert flow.policy is not None and flow.policy.reason.startswith("default-deny")


def test_denied_egress_verdict_to_a_world_name_prints_like_hubble() -> None:
    flow = build_flow(
        client_egress(
            "151.101.67.5", 2, type=ev.EVENT_POLICY_VERDICT, verdict=ev.VERDICT_DROPPED, is_reply=2
        ),
        ctx(),
    )
    assert format_line(flow) == (
        "Apr 28 01:04:16.656: default/internal-client:54006 (ID:23217) <> cnn.com:80 (world) "
        "policy-verdict:none EGRESS DENIED (TCP Flags: SYN)"
    )
    assert flow.destination_names == ["cnn.com"]
    assert flow.destination is not None and flow.destination.labels == ["reserved:world"]


def test_world_peer_without_a_name_prints_its_address() -> None:
    flow = build_flow(
        client_egress(
            "151.101.3.5",
            2,
            ts_ns=at(4, 28, "01:05:20", 563),
            type=ev.EVENT_POLICY_VERDICT,
            verdict=ev.VERDICT_DROPPED,
            is_reply=2,
        ),
        ctx(),
    )
    assert format_line(flow) == (
        "Apr 28 01:05:20.563: default/internal-client:54006 (ID:23217) <> 151.101.3.5:80 (world) "
        "policy-verdict:none EGRESS DENIED (TCP Flags: SYN)"
    )


def test_allowed_verdict_to_a_cidr_identity_names_the_fqdn_and_the_rule() -> None:
    flow = build_flow(
        client_egress(
            "34.117.118.44",
            CIDR_ID,
            ts_ns=at(4, 28, "01:08:27", 832),
            sport=54862,
            type=ev.EVENT_POLICY_VERDICT,
            match_type=ev.MATCH_L3_ONLY,
            cookie=FQDN_COOKIE,
        ),
        ctx(),
    )
    assert format_line(flow) == (
        "Apr 28 01:08:27.832: default/internal-client:54862 (ID:23217) -> ifconfig.me:80 (ID:16777219) "
        "policy-verdict:L3-Only EGRESS ALLOWED (TCP Flags: SYN)"
    )
    assert flow.is_reply is False and flow.policy_match_type == 1
    assert flow.policy is not None and flow.policy.name == "from-internal-client-to-fqdn"
    assert flow.destination is not None
    assert flow.destination.labels == ["cidr:34.117.118.44/32", "reserved:world"]


def test_a_denylist_verdict_is_policy_deny() -> None:
    flow = build_flow(
        xwing_to_deathstar(
            type=ev.EVENT_POLICY_VERDICT, verdict=ev.VERDICT_DROPPED, is_reply=2, cookie=DENY_COOKIE
        ),
        ctx(),
    )
    assert (flow.drop_reason, flow.drop_reason_desc) == (181, "POLICY_DENY")
    assert flow.policy is not None and flow.policy.rule == "ingressDeny[0]"


def test_redirected_verdict_prints_allowed() -> None:
    flow = build_flow(
        xwing_to_deathstar(
            type=ev.EVENT_POLICY_VERDICT,
            verdict=ev.VERDICT_REDIRECTED,
            match_type=ev.MATCH_L3_L4,
            cookie=ALLOW_COOKIE,
            proxy_port=15001,
        ),
        ctx(),
    )
    assert flow.verdict == "REDIRECTED"
    assert format_line(flow).endswith("policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)")
    assert flow.policy == RULE1


# --- compact lines: drops --------------------------------------------------------------------


def test_policy_drop_prints_like_hubble() -> None:
    flow = build_flow(
        xwing_to_deathstar(
            type=ev.EVENT_DROP, subtype=ev.DROP_POLICY, verdict=ev.VERDICT_DROPPED, is_reply=2
        ),
        ctx(),
    )
    assert format_line(flow) == (
        "Apr  5 21:03:18.803: default/xwing:45706 (ID:63406) <> default/deathstar-b4b8ccfb5-f75xw:80 (ID:6822) "
        "Policy denied DROPPED (TCP Flags: SYN)"
    )
    assert (flow.drop_reason, flow.drop_reason_desc) == (133, "POLICY_DENIED")
    assert flow.event_type == CiliumEventType(type=1, sub_type=133)
    assert flow.traffic_direction == "INGRESS"


def test_drops_never_know_whether_they_were_replies() -> None:
    flow = build_flow(
        xwing_to_deathstar(type=ev.EVENT_DROP, subtype=ev.DROP_CT_INVALID_HDR, is_reply=0), ctx()
    )
    assert flow.is_reply is None
    assert " <> " in format_line(flow)
    assert "CT: Truncated or invalid header DROPPED" in format_line(flow)
    assert flow.policy is None  # not a policy decision


def test_proxy_not_bound_drop() -> None:
    flow = build_flow(xwing_to_deathstar(type=ev.EVENT_DROP, subtype=ev.DROP_PROXY_NOT_BOUND), ctx())
    assert f"{ev.DROP_REASONS[ev.DROP_PROXY_NOT_BOUND]} DROPPED" in format_line(flow)
    assert flow.drop_reason_desc == "SOCKET_LOOKUP_FAILED"


# --- compact lines: traces -------------------------------------------------------------------


def test_to_endpoint_trace_prints_like_hubble() -> None:
    event = raw(
        ts_ns=at(4, 5, "21:03:13", 283),
        src_ep=TIEFIGHTER.id,
        dst_ep=DEATHSTAR.id,
        src_identity=TIEFIGHTER.identity,
        dst_identity=DEATHSTAR.identity,
        saddr=TIEFIGHTER.ip,
        daddr=DEATHSTAR.ip,
        sport=42746,
        dport=80,
        ifindex=17,
    )
    flow = build_flow(event, ctx())
    assert format_line(flow) == (
        "Apr  5 21:03:13.283: default/tiefighter:42746 (ID:25698) -> default/deathstar-b4b8ccfb5-f75xw:80 "
        "(ID:6822) to-endpoint FORWARDED (TCP Flags: SYN)"
    )
    assert flow.trace_observation_point == "TO_ENDPOINT"
    assert flow.interface is not None and (flow.interface.index, flow.interface.name) == (17, "lxc8ad1e2f7")
    assert flow_to_dict(flow)["event_type"] == {"type": 4}  # sub-type 0 is left out, as in Hubble


def test_reply_trace_flips_the_arrow() -> None:
    event = raw(
        ts_ns=at(4, 5, "21:03:13", 284),
        src_ep=DEATHSTAR.id,
        dst_ep=TIEFIGHTER.id,
        src_identity=DEATHSTAR.identity,
        dst_identity=TIEFIGHTER.identity,
        saddr=DEATHSTAR.ip,
        daddr=TIEFIGHTER.ip,
        sport=80,
        dport=42746,
        is_reply=1,
        direction=ev.DIR_EGRESS,
        tcp_flags=ev.TCP_SYN | ev.TCP_ACK,
    )
    flow = build_flow(event, ctx())
    assert flow.is_reply is True
    assert format_line(flow) == (
        "Apr  5 21:03:13.284: default/tiefighter:42746 (ID:25698) <- default/deathstar-b4b8ccfb5-f75xw:80 "
        "(ID:6822) to-endpoint FORWARDED (TCP Flags: SYN, ACK)"
    )


@pytest.mark.parametrize(
    ("flags", "ms", "summary"),
    [
        (ev.TCP_ACK, 854, "TCP Flags: ACK"),
        (ev.TCP_ACK | ev.TCP_PSH, 854, "TCP Flags: ACK, PSH"),
        (ev.TCP_ACK | ev.TCP_FIN, 894, "TCP Flags: ACK, FIN"),
    ],
)
def test_to_stack_trace_to_a_cidr_identity_prints_like_hubble(flags: int, ms: int, summary: str) -> None:
    flow = build_flow(
        client_egress(
            "34.117.118.44",
            CIDR_ID,
            ts_ns=at(4, 28, "01:08:27", ms),
            sport=54862,
            subtype=ev.TRACE_TO_STACK,
            tcp_flags=flags,
        ),
        ctx(),
    )
    assert format_line(flow) == (
        f"Apr 28 01:08:27.{ms}: default/internal-client:54862 (ID:23217) -> ifconfig.me:80 (ID:16777219) "
        f"to-stack FORWARDED ({summary})"
    )


def test_host_peer_prints_host() -> None:
    flow = build_flow(
        raw(
            src_ep=TIEFIGHTER.id,
            src_identity=TIEFIGHTER.identity,
            dst_identity=1,
            saddr=TIEFIGHTER.ip,
            daddr="10.0.0.1",
            sport=40000,
            dport=22,
            direction=ev.DIR_EGRESS,
            subtype=ev.TRACE_TO_HOST,
        ),
        ctx(),
    )
    assert format_line(flow) == (
        "Apr  5 21:03:18.803: default/tiefighter:40000 (ID:25698) -> 10.0.0.1:22 (host) to-host FORWARDED "
        "(TCP Flags: SYN)"
    )
    assert flow.destination is not None and flow.destination.labels == ["reserved:host"]


def test_icmp_echo_has_no_ports_and_names_the_type() -> None:
    event = xwing_to_deathstar(proto=1, sport=8 << 8, dport=4242, tcp_flags=0)
    flow = build_flow(event, ctx())
    assert format_line(flow) == (
        "Apr  5 21:03:18.803: default/xwing (ID:63406) -> default/deathstar-b4b8ccfb5-f75xw (ID:6822) "
        "to-endpoint FORWARDED (ICMPv4 EchoRequest)"
    )
    assert flow_to_dict(flow)["l4"] == {"ICMPv4": {"type": 8}}
    reply = build_flow(xwing_to_deathstar(proto=1, sport=0, dport=4242, tcp_flags=0), ctx())
    assert flow_to_dict(reply)["l4"] == {"ICMPv4": {}}  # type 0, code 0: protojson prints an empty object
    assert reply.Summary == "ICMPv4 EchoReply"
    unreachable = build_flow(xwing_to_deathstar(proto=1, sport=3 << 8 | 3, tcp_flags=0), ctx())
    assert unreachable.Summary == "ICMPv4 DestinationUnreachable(Port)"


def test_udp_summary() -> None:
    flow = build_flow(xwing_to_deathstar(proto=17, dport=53, tcp_flags=0), ctx())
    assert flow.Summary == "UDP"
    assert flow_to_dict(flow)["l4"] == {"UDP": {"source_port": 45706, "destination_port": 53}}
    assert format_line(flow).endswith(
        "default/deathstar-b4b8ccfb5-f75xw:53 (ID:6822) to-endpoint FORWARDED (UDP)"
    )


def test_print_node_name() -> None:
    flow = build_flow(xwing_to_deathstar(), ctx())
    assert format_line(flow, node_name=True).startswith(
        "Apr  5 21:03:18.803 [kind-kind/kind-worker]: default/xwing"
    )


def test_unknown_event_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown datapath event type"):
        build_flow(raw(type=99), ctx())


# --- compact lines: L7 (the proxies build these flows) -----------------------------------------

DEATHSTAR_URL = "http://deathstar.default.svc.cluster.local/v1"


def l7_flow(
    when: int, l7: Layer7, verdict: str, sport: int, src: Endpoint, dst: Endpoint, dport: int
) -> Flow:
    is_reply = l7.type == "RESPONSE"
    s_ip, d_ip = ("10.0.1.10", "10.0.1.30") if is_reply else ("10.0.1.30", "10.0.1.10")
    ports = (dport, sport) if is_reply else (sport, dport)
    return Flow(
        time=rfc3339_nano(when),
        verdict=verdict,  # type: ignore[arg-type]
        IP=IPHeader(source=s_ip, destination=d_ip, ipVersion="IPv4"),
        l4=Layer4(TCP=TCPHeader(source_port=ports[0], destination_port=ports[1])),
        source=dst if is_reply else src,
        destination=src if is_reply else dst,
        Type="L7",
        l7=l7,
        is_reply=is_reply,
        event_type=CiliumEventType(type=flows.MESSAGE_TYPE_ACCESS_LOG),
        traffic_direction="INGRESS",
        Summary=l7_summary(l7),
    )


TIE = Endpoint(identity=25698, namespace="default", pod_name="tiefighter")
DS = Endpoint(identity=6822, namespace="default", pod_name="deathstar-b4b8ccfb5-w84sn")
DS2 = Endpoint(identity=6822, namespace="default", pod_name="deathstar-b4b8ccfb5-f75xw")


def test_http_lines_print_like_hubble() -> None:
    post = HTTP(method="POST", url=f"{DEATHSTAR_URL}/request-landing", protocol="HTTP/1.1")
    put = HTTP(method="PUT", url=f"{DEATHSTAR_URL}/exhaust-port", protocol="HTTP/1.1")
    lines = [
        l7_flow(
            at(4, 5, "21:03:13", 283), Layer7(type="REQUEST", http=post), "FORWARDED", 42746, TIE, DS, 80
        ),
        l7_flow(
            at(4, 5, "21:03:13", 283),
            Layer7(type="RESPONSE", latency_ns=1_400_000, http=post.model_copy(update={"code": 200})),
            "FORWARDED",
            42746,
            TIE,
            DS,
            80,
        ),
        l7_flow(at(4, 5, "21:03:15", 919), Layer7(type="REQUEST", http=put), "DROPPED", 44396, TIE, DS2, 80),
        l7_flow(
            at(4, 5, "21:03:15", 919),
            Layer7(type="RESPONSE", latency_ns=10_000, http=put.model_copy(update={"code": 403})),
            "FORWARDED",
            44396,
            TIE,
            DS2,
            80,
        ),
    ]
    assert [format_line(f) for f in lines] == [
        "Apr  5 21:03:13.283: default/tiefighter:42746 (ID:25698) -> default/deathstar-b4b8ccfb5-w84sn:80 (ID:6822) http-request FORWARDED (HTTP/1.1 POST http://deathstar.default.svc.cluster.local/v1/request-landing)",
        "Apr  5 21:03:13.283: default/tiefighter:42746 (ID:25698) <- default/deathstar-b4b8ccfb5-w84sn:80 (ID:6822) http-response FORWARDED (HTTP/1.1 200 1ms (POST http://deathstar.default.svc.cluster.local/v1/request-landing))",
        "Apr  5 21:03:15.919: default/tiefighter:44396 (ID:25698) -> default/deathstar-b4b8ccfb5-f75xw:80 (ID:6822) http-request DROPPED (HTTP/1.1 PUT http://deathstar.default.svc.cluster.local/v1/exhaust-port)",
        "Apr  5 21:03:15.919: default/tiefighter:44396 (ID:25698) <- default/deathstar-b4b8ccfb5-f75xw:80 (ID:6822) http-response FORWARDED (HTTP/1.1 403 0ms (PUT http://deathstar.default.svc.cluster.local/v1/exhaust-port))",
    ]


def test_dns_lines_print_like_hubble() -> None:
    client = Endpoint(identity=23217, namespace="default", pod_name="internal-client")
    dns = Endpoint(identity=17513, namespace="kube-system", pod_name="coredns-76f75df574-rw29s")

    def dns_flow(ms: int, l7: Layer7) -> Flow:
        return l7_flow(at(4, 28, "01:03:39", ms), l7, "FORWARDED", 60700, client, dns, 53)

    query = DNS(query="ifconfig.me.", qtypes=["A"], observation_source="proxy")
    answer = query.model_copy(update={"ips": ["34.117.118.44"], "ttl": 30, "rrtypes": ["A"]})
    nxdomain = DNS(
        query="cnn.com.svc.cluster.local.",
        qtypes=["AAAA"],
        rcode=3,
        ttl=4294967295,
        observation_source="proxy",
    )
    many = DNS(
        query="cnn.com.",
        qtypes=["A"],
        ttl=30,
        observation_source="proxy",
        ips=["151.101.3.5", "151.101.131.5", "151.101.67.5", "151.101.195.5"],
    )
    got = [
        format_line(dns_flow(378, Layer7(type="REQUEST", dns=query))),
        format_line(dns_flow(424, Layer7(type="RESPONSE", dns=answer))),
        format_line(dns_flow(424, Layer7(type="RESPONSE", dns=nxdomain))),
        format_line(dns_flow(424, Layer7(type="RESPONSE", dns=many))),
    ]
    peers = "default/internal-client:60700 (ID:23217) {} kube-system/coredns-76f75df574-rw29s:53 (ID:17513)"
    assert got == [
        f"Apr 28 01:03:39.378: {peers.format('->')} dns-request proxy FORWARDED (DNS Query ifconfig.me. A)",
        f'Apr 28 01:03:39.424: {peers.format("<-")} dns-response proxy FORWARDED (DNS Answer "34.117.118.44" TTL: 30 (Proxy ifconfig.me. A))',
        f"Apr 28 01:03:39.424: {peers.format('<-')} dns-response proxy FORWARDED (DNS Answer RCode: Non-Existent Domain TTL: 4294967295 (Proxy cnn.com.svc.cluster.local. AAAA))",
        f'Apr 28 01:03:39.424: {peers.format("<-")} dns-response proxy FORWARDED (DNS Answer "151.101.3.5,151.101.131.5,151.101.67.5,151.101.195.5" TTL: 30 (Proxy cnn.com. A))',
    ]


def test_summary_is_computed_when_a_producer_left_it_empty() -> None:
    flow = l7_flow(
        at(4, 5, "21:03:13", 283),
        Layer7(type="REQUEST", dns=DNS(query="api.github.com.", qtypes=["A"])),
        "FORWARDED",
        1000,
        TIE,
        DS,
        53,
    ).model_copy(update={"Summary": ""})
    assert format_line(flow).endswith(
        "dns-request  FORWARDED (DNS Query api.github.com. A)"
    )  # hubble's double space


def test_dict_output() -> None:
    flow = build_flow(xwing_to_deathstar(type=ev.EVENT_DROP, subtype=ev.DROP_POLICY), ctx())
    assert format_dict(flow) == (
        "  TIMESTAMP: Apr  5 21:03:18.803\n"
        "     SOURCE: default/xwing:45706\n"
        "DESTINATION: default/deathstar-b4b8ccfb5-f75xw:80\n"
        "       TYPE: Policy denied\n"
        "    VERDICT: DROPPED\n"
        "    SUMMARY: TCP Flags: SYN"
    )


# --- JSON: Hubble's shape --------------------------------------------------------------------

# shared/seeds/004: `hubble observe -o json` (the seed's typo `" interface"` corrected)
SEED_TO_OVERLAY = """
{
  "flow": {
    "time": "2024-04-27T21:36:04.373296596Z",
    "uuid": "3ce41f60-b203-4e43-ab34-c89f631f7cd2",
    "verdict": "FORWARDED",
    "ethernet": {
      "source": "9e:f7:72:78:39:c7",
      "destination": "d6:55:a3:91:69:37"
    },
    "IP": {
      "source": "10.244.2.148",
      "destination": "10.244.1.170",
      "ipVersion": "IPv4"
    },
    "l4": {
      "TCP": {
        "source_port": 47812,
        "destination_port": 9080,
        "flags": {
          "ACK": true
        }
      }
    },
    "source": {
      "ID": 1881,
      "identity": 9889,
      "namespace": "default",
      "labels": [
        "k8s:app=productpage",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default",
        "k8s:io.cilium.k8s.policy.cluster=kind-kind",
        "k8s:io.cilium.k8s.policy.serviceaccount=bookinfo-productpage",
        "k8s:io.kubernetes.pod.namespace=default",
        "k8s:version=v1"
      ],
      "pod_name": "productpage-v1-675fc69cf-8zzxh",
      "workloads": [
        {
          "name": "productpage-v1",
          "kind": "Deployment"
        }
      ]
    },
    "destination": {
      "identity": 55669,
      "namespace": "default",
      "labels": [
        "k8s:app=reviews",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default",
        "k8s:io.cilium.k8s.policy.cluster=kind-kind",
        "k8s:io.cilium.k8s.policy.serviceaccount=bookinfo-reviews",
        "k8s:io.kubernetes.pod.namespace=default",
        "k8s:version=v1"
      ],
      "pod_name": "reviews-v1-5b5d6494f4-dwvpn"
    },
    "Type": "L3_L4",
    "node_name": "kind-kind/kind-worker3",
    "event_type": {
      "type": 4,
      "sub_type": 4
    },
    "traffic_direction": "EGRESS",
    "trace_observation_point": "TO_OVERLAY",
    "is_reply": false,
    " interface": {
      "index": 6,
      "name": "cilium_vxlan"
    },
    "Summary": "TCP Flags: ACK"
  },
  "node_name": "kind-kind/kind-worker3",
  "time": "2024-04-27T21:36:04.373296596Z"
}
""".replace('" interface"', '"interface"')
SEED_TO_ENDPOINT = """
{
  "flow": {
    "time": "2024-04-27T21:36:04.373343054Z",
    "uuid": "bf9df4cf-44b2-479a-bd41-9d232d5aacf6",
    "verdict": "FORWARDED",
    "ethernet": {
      "source": "72:e6:23:94:38:bb",
      "destination": "02:9e:93:c9:74:57"
    },
    "IP": {
      "source": "10.244.2.148",
      "destination": "10.244.1.170",
      "ipVersion": "IPv4"
    },
    "l4": {
      "TCP": {
        "source_port": 47812,
        "destination_port": 9080,
        "flags": {
          "ACK": true
        }
      }
    },
    "source": {
      "identity": 9889,
      "namespace": "default",
      "labels": [
        "k8s:app=productpage",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default",
        "k8s:io.cilium.k8s.policy.cluster=kind-kind",
        "k8s:io.cilium.k8s.policy.serviceaccount=bookinfo-productpage",
        "k8s:io.kubernetes.pod.namespace=default",
        "k8s:version=v1"
      ],
      "pod_name": "productpage-v1-675fc69cf-8zzxh"
    },
    "destination": {
      "ID": 2039,
      "identity": 55669,
      "namespace": "default",
      "labels": [
        "k8s:app=reviews",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default",
        "k8s:io.cilium.k8s.policy.cluster=kind-kind",
        "k8s:io.cilium.k8s.policy.serviceaccount=bookinfo-reviews",
        "k8s:io.kubernetes.pod.namespace=default",
        "k8s:version=v1"
      ],
      "pod_name": "reviews-v1-5b5d6494f4-dwvpn",
      "workloads": [
        {
          "name": "reviews-v1",
          "kind": "Deployment"
        }
      ]
    },
    "Type": "L3_L4",
    "node_name": "kind-kind/kind-worker",
    "event_type": {
      "type": 4
    },
    "traffic_direction": "INGRESS",
    "trace_observation_point": "TO_ENDPOINT",
    "is_reply": false,
    "interface": {
      "index": 15,
      "name": "lxc240530c746ff"
    },
    "Summary": "TCP Flags: ACK"
  },
  "node_name": "kind-kind/kind-worker",
  "time": "2024-04-27T21:36:04.373343054Z"
}
"""
PRODUCTPAGE = EndpointInfo(
    "default",
    "productpage-v1-675fc69cf-8zzxh",
    9889,
    (
        "k8s:app=productpage",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default",
        "k8s:io.cilium.k8s.policy.cluster=kind-kind",
        "k8s:io.cilium.k8s.policy.serviceaccount=bookinfo-productpage",
        "k8s:io.kubernetes.pod.namespace=default",
        "k8s:version=v1",
    ),
    "10.244.2.148",
)
REVIEWS = EndpointInfo(
    "default",
    "reviews-v1-5b5d6494f4-dwvpn",
    55669,
    (
        "k8s:app=reviews",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default",
        "k8s:io.cilium.k8s.policy.cluster=kind-kind",
        "k8s:io.cilium.k8s.policy.serviceaccount=bookinfo-reviews",
        "k8s:io.kubernetes.pod.namespace=default",
        "k8s:version=v1",
    ),
    "10.244.1.170",
)


def without(doc: dict[str, Any], *paths: str) -> dict[str, Any]:
    out = json.loads(json.dumps(doc))
    for path in paths:
        *parents, last = path.split(".")
        node = out
        for p in parents:
            node = node[p]
        node.pop(last, None)
    return out


@pytest.mark.parametrize("seed", [SEED_TO_OVERLAY, SEED_TO_ENDPOINT])
def test_hubble_json_round_trips_unchanged(seed: str) -> None:
    envelope = json.loads(seed)
    flow = parse_json(seed)
    assert json.loads(to_json_line(flow)) == envelope


def test_a_built_flow_has_hubbles_json_shape_and_values() -> None:
    """The seed's to-overlay flow on kind-worker3, rebuilt from a datapath event."""
    seed = json.loads(SEED_TO_OVERLAY)["flow"]
    wall = parse_rfc3339(seed["time"])
    context = ctx(
        node_name="kind-kind/kind-worker3",
        endpoints=(EndpointInfo(**{**PRODUCTPAGE.__dict__, "id": 1881}), REVIEWS),
        boot_offset_ns=wall - 5_000_000_000,
    )
    event = raw(
        ts_ns=5_000_000_000,
        subtype=ev.TRACE_TO_OVERLAY,
        direction=ev.DIR_EGRESS,
        src_ep=1881,
        src_identity=9889,
        dst_identity=55669,
        saddr="10.244.2.148",
        daddr="10.244.1.170",
        sport=47812,
        dport=9080,
        tcp_flags=ev.TCP_ACK,
        ifindex=6,
    )
    built = flow_to_dict(build_flow(event, context, flow_uuid=lambda: seed["uuid"]))
    assert built == without(seed, "ethernet", "source.workloads")
    assert list(built) == [k for k in seed if k != "ethernet"]  # Hubble's field order


def test_json_line_is_one_compact_envelope() -> None:
    flow = build_flow(xwing_to_deathstar(type=ev.EVENT_DROP, subtype=ev.DROP_POLICY), ctx())
    line = to_json_line(flow)
    assert "\n" not in line and ", " not in line.split('"labels"')[0]
    doc = json.loads(line)
    assert list(doc) == ["flow", "node_name", "time"]
    assert doc["time"] == doc["flow"]["time"] == "2024-04-05T21:03:18.803Z"
    assert doc["flow"]["drop_reason_desc"] == "POLICY_DENIED" and doc["flow"]["drop_reason"] == 133
    assert "is_reply" not in doc["flow"]  # unknown: absent, not false
    assert doc["flow"]["policy"] == {"reason": "default-deny (no rule allows this traffic)"}
    assert parse_json(line) == flow


def test_policy_extension_names_the_rule() -> None:
    flow = build_flow(
        xwing_to_deathstar(type=ev.EVENT_POLICY_VERDICT, match_type=ev.MATCH_L3_ONLY, cookie=ALLOW_COOKIE),
        ctx(),
    )
    assert flow_to_dict(flow)["policy"] == {
        "name": "rule1",
        "namespace": "default",
        "kind": "CiliumNetworkPolicy",
        "rule": "ingress[0]",
        "reason": "default/rule1 ingress[0]",
    }
    assert flow_to_dict(flow)["policy_match_type"] == 1


def test_malformed_json_is_a_flow_error() -> None:
    with pytest.raises(FlowError):
        parse_json(b"{not json")
    with pytest.raises(FlowError, match="verdict"):
        parse_json('{"flow": {"verdict": "MAYBE"}}')


# --- tables agree with the datapath ------------------------------------------------------------


def test_text_tables_agree_with_the_datapath_event_types() -> None:
    assert flows.TRACE_POINTS == ev.TRACE_POINTS
    assert flows.POLICY_MATCH_TYPES == ev.MATCH_TYPES
    for code, text in ev.DROP_REASONS.items():
        assert flows.DROP_REASON_TEXTS[code] == text
        assert code in flows.DROP_REASON_NAMES


# --- time ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (1714253764_000000000, "2024-04-27T21:36:04Z"),
        (1714253764_373000000, "2024-04-27T21:36:04.373Z"),
        (1714253764_373296000, "2024-04-27T21:36:04.373296Z"),
        (1714253764_373296596, "2024-04-27T21:36:04.373296596Z"),
    ],
)
def test_times_are_written_as_protojson_does(ns: int, text: str) -> None:
    assert rfc3339_nano(ns) == text
    assert parse_rfc3339(text) == ns


def test_since_accepts_durations_and_times() -> None:
    now = 1714253764 * 10**9
    assert parse_time("5m", now) == now - 300 * 10**9
    assert parse_time("1h30m", now) == now - 5400 * 10**9
    assert parse_time("2024-04-27", now) == 1714176000 * 10**9
    assert parse_time("2024-04-27T21:36", now) == 1714253760 * 10**9
    assert parse_time("2024-04-27T23:36:04+02:00", now) == now
    with pytest.raises(FlowError, match="invalid time"):
        parse_time("yesterday", now)


# --- filters ---------------------------------------------------------------------------------


def make(src: tuple[str, str, int], dst: tuple[str, str, int], **kw: Any) -> Flow:
    """A flow between (namespace, pod, identity) pairs; an empty pod is a peer outside the cluster."""

    def ep(ns: str, pod: str, identity: int) -> Endpoint:
        return Endpoint(namespace=ns, pod_name=pod, identity=identity)

    fields: dict[str, Any] = {
        "time": "2024-04-05T21:03:18.803Z",
        "verdict": "FORWARDED",
        "IP": IPHeader(source="10.0.1.20", destination="10.0.1.10", ipVersion="IPv4"),
        "l4": Layer4(TCP=TCPHeader(source_port=45706, destination_port=80)),
        "source": ep(*src),
        "destination": ep(*dst),
        "node_name": "kind-kind/kind-worker",
        "event_type": CiliumEventType(type=4),
        "traffic_direction": "INGRESS",
    }
    fields.update(kw)
    return Flow(**fields)


X = ("default", "xwing", 63406)
D = ("default", "deathstar-b4b8ccfb5-f75xw", 6822)
C = ("kube-system", "coredns-76f75df574-rw29s", 17513)
W = ("", "", 2)
X_TO_D = make(X, D)
D_TO_X = make(D, X)
X_TO_C = make(
    X, C, l4=Layer4(UDP=UDPHeader(source_port=5000, destination_port=53)), traffic_direction="EGRESS"
)
X_TO_W = make(
    X, W, verdict="DROPPED", event_type=CiliumEventType(type=1, sub_type=133), traffic_direction="EGRESS"
)
HTTP_FLOW = make(
    X, D, Type="L7", l7=Layer7(type="REQUEST", http=HTTP(method="GET")), event_type=CiliumEventType(type=129)
)
ALL = [X_TO_D, D_TO_X, X_TO_C, X_TO_W, HTTP_FLOW]


def picked(**kw: Any) -> list[Flow]:
    flt = FlowFilter(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
    return [f for f in ALL if flt.matches(f)]


def test_no_filter_matches_everything() -> None:
    assert picked() == ALL


def test_pod_matches_either_side_by_name_prefix_in_the_default_namespace() -> None:
    assert picked(pod=["deathstar"]) == [X_TO_D, D_TO_X, HTTP_FLOW]
    assert picked(pod=["default/deathstar-b4b8"]) == [X_TO_D, D_TO_X, HTTP_FLOW]
    assert picked(pod=["coredns"]) == []  # not in the namespace default
    assert picked(pod=["kube-system/"]) == [X_TO_C]


def test_from_pod_and_to_pod_match_one_side() -> None:
    assert picked(from_pod=["xwing"]) == [X_TO_D, X_TO_C, X_TO_W, HTTP_FLOW]
    assert picked(to_pod=["xwing"]) == [D_TO_X]
    assert picked(from_pod=["xwing"], to_pod=["kube-system/coredns"]) == [X_TO_C]


def test_namespace_matches_flows_from_or_to_it() -> None:
    assert picked(namespace=["kube-system"]) == [X_TO_C]
    assert picked(namespace=["kube-system"], pod=["coredns"]) == [X_TO_C]
    with pytest.raises(FlowError, match="namespace conflict"):
        FlowFilter(namespace=("kube-system",), pod=("default/xwing",))


def test_identity_filters_accept_numbers_and_reserved_names() -> None:
    assert picked(identity=["world"]) == [X_TO_W]
    assert picked(from_identity=["6822"]) == [D_TO_X]
    assert picked(to_identity=["6822"]) == [X_TO_D, HTTP_FLOW]
    with pytest.raises(FlowError, match="invalid security identity"):
        FlowFilter(identity=("galaxy",))


def test_verdict_protocol_type_node_and_direction() -> None:
    assert picked(verdict=["DROPPED"]) == [X_TO_W]
    assert picked(verdict=["dropped", "FORWARDED"]) == ALL
    assert picked(protocol=["udp"]) == [X_TO_C]
    assert picked(protocol=["http"]) == [HTTP_FLOW]
    assert picked(protocol=["tcp"]) == [X_TO_D, D_TO_X, X_TO_W, HTTP_FLOW]
    assert picked(type=["drop"]) == [X_TO_W]
    assert picked(type=["l7"]) == [HTTP_FLOW]
    assert picked(type=["trace:to-endpoint"]) == [X_TO_D, D_TO_X, X_TO_C]
    assert picked(type=["trace:to-stack"]) == []
    assert picked(node_name=["kind-kind/*"]) == ALL
    assert picked(node_name=["other"]) == []
    assert picked(traffic_direction=["egress"]) == [X_TO_C, X_TO_W]


def test_ip_and_port_filters() -> None:
    assert picked(to_port=["53"]) == [X_TO_C]
    assert picked(port=["80"]) == [X_TO_D, D_TO_X, X_TO_W, HTTP_FLOW]
    assert picked(from_ip=["10.0.1.0/24"]) == ALL
    assert picked(to_ip=["10.0.1.20"]) == []


def test_time_window() -> None:
    t = parse_rfc3339("2024-04-05T21:03:18.803Z")
    assert picked(since=t) == ALL
    assert picked(since=t + 1) == []
    assert picked(until=t - 1) == []


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"pod": ("xwing",), "from_pod": ("deathstar",)}, "--from-pod and --pod cannot be combined"),
        ({"identity": ("2",), "to_identity": ("3",)}, "cannot be combined"),
        ({"verdict": ("MAYBE",)}, "invalid --verdict value: MAYBE"),
        ({"protocol": ("quic",)}, "unknown protocol"),
        ({"type": ("trace:to-mars",)}, "unknown sub-type"),
        ({"type": ("capture-the-flag",)}, "invalid --type"),
        ({"ip": ("10.0.0.300",)}, "invalid IP filter"),
        ({"port": ("http",)}, "invalid port"),
        ({"traffic_direction": ("sideways",)}, "invalid traffic direction"),
    ],
)
def test_invalid_filters_are_refused_with_one_line(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(FlowError) as err:
        FlowFilter(**kw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
