"""The incremental engine: a policy change yields the map-state diff of the endpoints it concerns,
without recomputing the others, and always ends where a full recomputation would."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policygen import cnp, inventory

from cilia.models import parse_documents
from cilia.policy.engine import PolicyEngine
from cilia.policy.mapstate import MapKey
from cilia.policy.repository import Repository


def doc(name: str, spec: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def fresh_entries(engine: PolicyEngine) -> dict[Any, dict[MapKey, Any]]:
    repo = Repository()
    repo.apply([o for _, o in engine.repo.items()])
    full = PolicyEngine(engine.inventory, engine.options, repo)
    full.ipcache = engine.ipcache  # same CIDR identity numbers as the incremental engine
    from cilia.policy.selectorcache import SelectorCache

    full.cache = SelectorCache(engine.ipcache.identities.values())
    return {k: p.entries for k, p in full.compute_all().items()}


def test_a_policy_for_one_app_recomputes_only_that_subject() -> None:
    inv = inventory()
    engine = PolicyEngine(inv)
    engine.compute_all()
    update = engine.apply(
        parse_documents(
            [
                doc(
                    "web",
                    {
                        "endpointSelector": {"matchLabels": {"app": "a"}},
                        "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}],
                    },
                )
            ]
        )  # type: ignore[arg-type]
    )
    assert update.recomputed == 1  # app=a in namespace default: one identity
    (key,) = update.diffs
    assert inv.cluster_identities()[key[0]].by_extended_key["k8s:app"] == "a"
    upserts = {str(k) for k in update.diffs[key].upserts}
    assert "ingress ANY 80/TCP" in upserts
    assert any(str(k) == "ingress ANY ANY" for k in update.diffs[key].deletes)  # no longer allow-all


def test_deleting_the_policy_restores_the_previous_map_state() -> None:
    engine = PolicyEngine(inventory())
    before = {k: p.entries for k, p in engine.compute_all().items()}
    objs = parse_documents([doc("web", {"endpointSelector": {"matchLabels": {"app": "a"}}, "egress": [{}]})])
    engine.apply(objs)  # type: ignore[arg-type]
    update = engine.delete(("CiliumNetworkPolicy", "default", "web"))
    assert update.recomputed == 1
    assert {k: p.entries for k, p in engine.policies.items()} == before


def test_a_new_cidr_prefix_refreshes_only_the_new_identity_for_subjects_that_select_it() -> None:
    engine = PolicyEngine(inventory())
    engine.compute_all()
    engine.apply(
        parse_documents(
            [
                doc(
                    "to-ten",
                    {
                        "endpointSelector": {"matchLabels": {"app": "a"}},
                        "egress": [{"toCIDR": ["10.0.0.0/8"]}],
                    },
                )
            ]
        )
    )  # type: ignore[arg-type]
    update = engine.apply(
        parse_documents(
            [
                doc(
                    "other",
                    {
                        "endpointSelector": {"matchLabels": {"app": "b"}},
                        "egress": [{"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]}],
                    },
                )
            ]
        )  # type: ignore[arg-type]
    )
    assert update.recomputed == 1 and update.refreshed == 1  # app=a gains the new 10.1.0.0/16 identity
    new_id = engine.ipcache.prefixes[__import__("ipaddress").ip_network("10.1.0.0/16")]
    a_key = next(k for k, p in engine.policies.items() if p.subject == "default/a-default")
    assert any(k.identity == new_id for k in update.diffs[a_key].upserts)
    assert {k: p.entries for k, p in engine.policies.items()} == fresh_entries(engine)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(["apply", "apply", "delete"]), st.integers(0, 4), st.data()),
        min_size=1,
        max_size=8,
    )
)
def test_incremental_updates_end_where_a_full_recomputation_ends(
    ops: list[tuple[str, int, st.DataObject]],
) -> None:
    engine = PolicyEngine(inventory())
    engine.compute_all()
    for action, n, data in ops:
        d = data.draw(cnp(n))
        key = (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])
        if action == "apply":
            engine.apply(parse_documents([d]))  # type: ignore[arg-type]
        elif key in engine.repo:
            engine.delete(key)
        assert {k: p.entries for k, p in engine.policies.items()} == fresh_entries(engine)


def test_fqdn_ips_open_matching_selectors_and_close_again_when_their_names_expire() -> None:
    import ipaddress

    engine = PolicyEngine(inventory())
    engine.compute_all()
    engine.apply(
        parse_documents(
            [
                doc(
                    "fqdn",
                    {
                        "endpointSelector": {"matchLabels": {"app": "a"}},
                        "egress": [{"toFQDNs": [{"matchPattern": "*.github.com"}]}],
                    },
                )
            ]
        )  # type: ignore[arg-type]
    )
    before = {k: p.entries for k, p in engine.policies.items()}
    ip = ipaddress.ip_address("198.51.100.10")
    update = engine.add_fqdn_ips({ip: ["api.github.com"]})
    ident = engine.ipcache.lookup(ip)
    assert ident >= 1 << 24
    a_key = next(k for k, p in engine.policies.items() if p.subject == "default/a-default")
    assert any(k.identity == ident and k.direction == "egress" for k in update.diffs[a_key].upserts)
    # A name that matches no selector opens nothing.
    other = ipaddress.ip_address("198.51.100.12")
    assert not engine.add_fqdn_ips({other: ["github.com"]}).diffs
    engine.remove_fqdn_ips({ip: ["api.github.com"], other: None})
    assert engine.ipcache.lookup(ip) != ident
    assert {k: p.entries for k, p in engine.policies.items()} == before
