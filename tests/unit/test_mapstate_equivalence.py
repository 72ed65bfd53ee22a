"""The map state, looked up as the datapath does, gives the same verdicts as walking the rules."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policygen import inventory, mentioned_ports, packet, peer, policies

from cilia.models import parse_documents
from cilia.policy.context import Peer, PolicyContext, PolicyOptions
from cilia.policy.ipcache import IPCache
from cilia.policy.l4 import proto_number
from cilia.policy.mapstate import compute_policy
from cilia.policy.repository import Repository
from cilia.policy.rules import EGRESS, INGRESS
from cilia.policy.selectorcache import SelectorCache
from cilia.policy.verdict import verdict

INV = inventory()


def mapstate_verdict(
    ctx: PolicyContext, src: Peer, dst: Peer, port: int, proto: str, l7: object
) -> tuple[bool, list[str | None]]:
    fqdn = {p.net.network_address: p.names for p in (src, dst) if p.net is not None and p.names}
    ipcache = IPCache.build(ctx.inventory, ctx.rules, fqdn)
    cache = SelectorCache(ipcache.identities.values())

    def ident(p: Peer) -> int:
        return ipcache.lookup(p.net.network_address) if p.net is not None else p.identity

    allowed = True
    redirects: list[str | None] = []
    num = proto_number(proto)
    for subject, direction, remote in ((src, EGRESS, dst), (dst, INGRESS, src)):
        if not ctx.is_subject(subject):
            redirects.append(None)
            continue
        policy = compute_policy(ctx, cache, subject)
        ok, _, parser = policy.decide(direction, ident(remote), num, port, l7)  # type: ignore[arg-type]
        redirects.append(parser)
        allowed = allowed and ok
        if not ok:
            break
    return allowed, redirects


def check_equivalence(data: st.DataObject, docs: list[dict], mode: str, focus: str) -> None:
    repo = Repository()
    repo.apply(parse_documents(docs))  # type: ignore[arg-type]
    ctx = PolicyContext(repo.rules(), INV, PolicyOptions(enforcement=mode))  # type: ignore[arg-type]
    ports = mentioned_ports(docs)
    for _ in range(6):
        src, dst = data.draw(peer(INV)), data.draw(peer(INV))
        port, proto, l7 = data.draw(packet(ports, focus))
        expected = verdict(ctx, src, dst, port, proto, l7)
        got, redirects = mapstate_verdict(ctx, src, dst, port, proto, l7)
        assert got == expected.allowed, (expected, redirects)
        if expected.allowed:
            want = [d.redirect if d is not None else None for d in (expected.egress, expected.ingress)]
            assert redirects == want, (expected, redirects)


MODES = st.sampled_from(["default", "default", "default", "always", "never"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), docs=policies(), mode=MODES)
def test_mapstate_agrees_with_verdict_on_mixed_policies(
    data: st.DataObject, docs: list[dict], mode: str
) -> None:
    check_equivalence(data, docs, mode, "mixed")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), docs=policies(focus="deny"), mode=MODES)
def test_mapstate_agrees_with_verdict_when_denies_overlap_allows(
    data: st.DataObject, docs: list[dict], mode: str
) -> None:
    check_equivalence(data, docs, mode, "deny")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), docs=policies(focus="l7"), mode=MODES)
def test_mapstate_and_proxy_rules_agree_with_verdict_on_l7(
    data: st.DataObject, docs: list[dict], mode: str
) -> None:
    check_equivalence(data, docs, mode, "l7")
