"""Star Wars on real packets: the eBPF datapath enforces rule1 between endpoint namespaces, curl included."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Node, eventually

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"
CURL = ("curl", "-s", "-m", "2", "-o", "-", "-w", "\n%{http_code}")


@pytest.fixture
def starwars(node: Node) -> Node:
    node.add("deathstar-1", {"org": "empire", "class": "deathstar"})
    node.add("tiefighter", {"org": "empire", "class": "tiefighter"})
    node.add("xwing", {"org": "alliance", "class": "xwing"})
    node.serve("default/deathstar-1", "http", 80)
    node.serve("default/deathstar-1", "tcp-echo", 443)
    return node


def land(node: Node, ship: str, port: int = 80) -> tuple[int, str]:
    target = node.ip("default/deathstar-1")
    out = node.exec(f"default/{ship}", *CURL, "-XPOST", f"http://{target}:{port}/v1/request-landing")
    return out.returncode, out.stdout


def test_without_policy_every_ship_lands(starwars: Node) -> None:
    assert land(starwars, "xwing") == (0, "Ship landed\n\n200")
    assert land(starwars, "tiefighter") == (0, "Ship landed\n\n200")


def test_rule1_lets_tiefighter_land_and_xwing_time_out(starwars: Node) -> None:
    starwars.apply((EXAMPLES / "starwars-l3-l4.yaml").read_text())
    assert land(starwars, "tiefighter") == (0, "Ship landed\n\n200")
    code, _ = land(starwars, "xwing")
    assert code == 28  # curl: operation timed out (the SYN was dropped)


def test_rule1_denies_tiefighter_on_port_443(starwars: Node) -> None:
    starwars.apply((EXAMPLES / "starwars-l3-l4.yaml").read_text())
    code, _ = land(starwars, "tiefighter", 443)
    assert code == 28


def test_the_drop_shows_as_a_flow_with_identities_and_the_rule(starwars: Node) -> None:
    starwars.apply((EXAMPLES / "starwars-l3-l4.yaml").read_text())
    land(starwars, "xwing")
    xwing = starwars.endpoint("default/xwing")
    deathstar = starwars.endpoint("default/deathstar-1")

    def dropped() -> list[dict]:
        return [
            f
            for f in starwars.flows()
            if f["verdict"] == "DROPPED"
            and f.get("drop_reason_desc") == "POLICY_DENIED"
            and f["source"].get("pod_name") == "xwing"
        ]

    drops = eventually(dropped, what="a policy drop flow from xwing")
    flow = drops[0]
    assert flow["source"]["identity"] == xwing["identity"]
    assert flow["destination"]["identity"] == deathstar["identity"]
    assert flow["destination"]["pod_name"] == "deathstar-1"
    assert flow["l4"]["TCP"]["destination_port"] == 80
    assert flow["l4"]["TCP"]["flags"] == {"SYN": True}
    verdicts = [
        f
        for f in starwars.flows()
        if f.get("event_type", {}).get("type") == 5
        and f["verdict"] == "DROPPED"
        and f["source"].get("pod_name") == "xwing"
    ]
    assert verdicts and verdicts[0]["traffic_direction"] == "INGRESS"
    assert verdicts[0].get("policy_match_type") in (None, 0)  # "none": nothing matched


def test_allowed_connection_shows_the_rule_that_decided(starwars: Node) -> None:
    starwars.apply((EXAMPLES / "starwars-l3-l4.yaml").read_text())
    land(starwars, "tiefighter")

    def allowed() -> list[dict]:
        return [
            f
            for f in starwars.flows()
            if f.get("event_type", {}).get("type") == 5
            and f["verdict"] == "FORWARDED"
            and f["source"].get("pod_name") == "tiefighter"
        ]

    flow = eventually(allowed, what="an allowed policy verdict")[0]
    assert flow["policy"]["name"] == "rule1"
    assert flow["policy"]["namespace"] == "default"
    assert flow["policy"]["rule"] == "ingress[0]"
    assert flow["traffic_direction"] == "INGRESS"
