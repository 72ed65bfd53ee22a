"""Cilium's selection semantics: selectors, label sources, namespaces, entities, identities, label filter.

Ground truth: /work/notes/semantics-B.md (Q3 entities and reserved identities, Q5 namespaced
selector rewriting, Q6 label filter, Q8 subject matching) with the Cilium sources cited there.
Each test states one point and asserts something the engine could get wrong.
"""

from __future__ import annotations

from scenario_helpers import allowed, ccnp, cnp, pod, probe, run, sel

from cilia import identity
from cilia.labelfilter import identity_labels
from cilia.labels import Label, LabelSet
from cilia.policy.inventory import Inventory, Workload, reserved_identities
from cilia.policy.selector import EndpointSelector

PODS = [
    pod("client", "10.0.1.1", {"app": "client"}),
    pod("server", "10.0.1.2", {"app": "server"}),
    pod("other", "10.0.1.3", {"app": "other"}),
    pod("client", "10.0.2.1", {"app": "client"}, namespace="prod"),
    pod("server", "10.0.2.2", {"app": "server"}, namespace="prod"),
]
NAMESPACES = {"default": {"team": "core"}, "prod": {"team": "payments"}}
OUTSIDE = {"ip": "203.0.113.7"}


def ingress_to_server(peer_rule: dict, namespace: str = "default") -> dict:
    """A CNP selecting app=server (in `namespace`) whose only ingress element is `peer_rule`."""
    return cnp("allow", {"endpointSelector": sel(app="server"), "ingress": [peer_rule]}, namespace)


def egress_from_client(peer_rule: dict) -> dict:
    return cnp("allow", {"endpointSelector": sel(app="client"), "egress": [peer_rule]})


# --- endpoint selectors (label selectors over Cilium labels) -----------------------------------


def labels(*items: str) -> LabelSet:
    return LabelSet.of(items)


def test_match_labels_requires_every_label() -> None:
    s = EndpointSelector.build({"k8s:app": "web", "k8s:tier": "front"})
    assert s.selects(labels("k8s:app=web", "k8s:tier=front", "k8s:extra=1"))
    assert not s.selects(labels("k8s:app=web"))
    assert not s.selects(labels("k8s:app=web", "k8s:tier=back"))


def test_match_expression_in_matches_any_listed_value() -> None:
    s = EndpointSelector.build(None, [("k8s:env", "In", ["dev", "test"])])
    assert s.selects(labels("k8s:env=test"))
    assert not s.selects(labels("k8s:env=prod"))
    assert not s.selects(labels("k8s:app=x"))  # absent key never satisfies In


def test_match_expression_not_in_matches_absent_key() -> None:
    s = EndpointSelector.build(None, [("k8s:env", "NotIn", ["prod"])])
    assert s.selects(labels("k8s:app=x"))  # key absent: NotIn holds (Kubernetes semantics)
    assert s.selects(labels("k8s:env=dev"))
    assert not s.selects(labels("k8s:env=prod"))


def test_match_expression_exists_ignores_value() -> None:
    s = EndpointSelector.build(None, [("k8s:env", "Exists", [])])
    assert s.selects(labels("k8s:env=anything"))
    assert s.selects(labels("k8s:env="))
    assert not s.selects(labels("k8s:app=x"))


def test_match_expression_does_not_exist() -> None:
    s = EndpointSelector.build(None, [("k8s:env", "DoesNotExist", [])])
    assert s.selects(labels("k8s:app=x"))
    assert not s.selects(labels("k8s:env=dev"))


def test_empty_selector_selects_every_label_set() -> None:
    s = EndpointSelector.build({}, [])
    assert s.selects(labels("reserved:world"))
    assert s.selects(labels("k8s:app=x"))
    assert s.selects(LabelSet())


def test_key_without_source_matches_label_of_any_source() -> None:
    s = EndpointSelector.build({"app": "web"})
    assert s.selects(labels("k8s:app=web"))
    assert s.selects(labels("container:app=web"))
    assert not s.selects(labels("k8s:app=db"))


def test_k8s_source_key_matches_only_k8s_labels() -> None:
    s = EndpointSelector.build({"k8s:app": "web"})
    assert s.selects(labels("k8s:app=web"))
    assert not s.selects(labels("container:app=web"))


def test_reserved_source_key_matches_only_reserved_labels() -> None:
    s = EndpointSelector.build({"reserved:host": ""})
    assert s.selects(labels("reserved:host"))
    assert not s.selects(labels("k8s:host="))
    assert not s.selects(labels("reserved:world"))


def test_selector_key_without_source_in_policy_matches_k8s_pod_label() -> None:
    # Policies usually write bare keys (`app: server`): they must match the pod's k8s: labels.
    v = run(
        PODS,
        [ingress_to_server({"fromEndpoints": [sel(app="client")]})],
        [probe("default/client", "default/server"), probe("default/other", "default/server")],
    )
    assert allowed(v) == [True, False]


def test_policy_k8s_prefixed_key_matches_pod_label() -> None:
    v = run(
        PODS,
        [ingress_to_server({"fromEndpoints": [{"matchLabels": {"k8s:app": "client"}}]})],
        [probe("default/client", "default/server"), probe("default/other", "default/server")],
    )
    assert allowed(v) == [True, False]


# --- namespaces ----------------------------------------------------------------------------------


def test_cnp_empty_endpoint_selector_selects_only_pods_of_its_namespace() -> None:
    policy = cnp("lockdown", {"endpointSelector": {}, "ingress": [{}]}, namespace="prod")
    v = run(PODS, [policy], [probe("default/client", "prod/server"), probe("prod/client", "default/server")])
    assert v[0].allowed is False  # prod/server is selected: ingress: [{}] denies everything
    assert v[0].reason.startswith("default-deny")
    assert v[1].allowed is True  # default/server is not selected by a prod policy
    assert v[1].reason.startswith("default-allow")


def test_cnp_endpoint_selector_naming_another_namespace_still_applies_only_in_its_own() -> None:
    # ParseToCiliumRule overwrites any namespace match of a CNP's endpointSelector.
    spec = {
        "endpointSelector": {"matchLabels": {"app": "server", "k8s:io.kubernetes.pod.namespace": "default"}},
        "ingress": [{}],
    }
    v = run(
        PODS,
        [cnp("x", spec, namespace="prod")],
        [probe("default/client", "default/server"), probe("default/client", "prod/server")],
    )
    assert allowed(v) == [True, False]


def test_cnp_from_endpoints_stays_in_policy_namespace() -> None:
    v = run(
        PODS,
        [ingress_to_server({"fromEndpoints": [sel(app="client")]})],
        [probe("default/client", "default/server"), probe("prod/client", "default/server")],
    )
    assert allowed(v) == [True, False]


def test_cnp_from_endpoints_empty_selector_means_all_pods_of_policy_namespace() -> None:
    v = run(
        PODS,
        [ingress_to_server({"fromEndpoints": [{}]})],
        [
            probe("default/other", "default/server"),
            probe("prod/client", "default/server"),
            probe({"entity": "world"}, "default/server"),
            probe(OUTSIDE, "default/server"),
        ],
    )
    assert allowed(v) == [True, False, False, False]


def test_cnp_from_endpoints_naming_namespace_label_selects_that_namespace() -> None:
    peer = {"matchLabels": {"app": "client", "k8s:io.kubernetes.pod.namespace": "prod"}}
    v = run(
        PODS,
        [ingress_to_server({"fromEndpoints": [peer]})],
        [probe("prod/client", "default/server"), probe("default/client", "default/server")],
    )
    assert allowed(v) == [True, False]


def test_cnp_from_endpoints_namespace_exists_selects_all_namespaces() -> None:
    peer = {
        "matchLabels": {"app": "client"},
        "matchExpressions": [{"key": "io.kubernetes.pod.namespace", "operator": "Exists"}],
    }
    v = run(
        PODS,
        [ingress_to_server({"fromEndpoints": [peer]})],
        [
            probe("prod/client", "default/server"),
            probe("default/client", "default/server"),
            probe("prod/server", "default/server"),
        ],
    )
    assert allowed(v) == [True, True, False]


def test_cnp_from_endpoints_namespace_not_in_is_not_rewritten_to_policy_namespace() -> None:
    # Any operator on the namespace key stops getEndpointSelector from adding the policy namespace.
    peer = {
        "matchExpressions": [
            {"key": "k8s:io.kubernetes.pod.namespace", "operator": "NotIn", "values": ["default"]}
        ]
    }
    v = run(
        PODS,
        [ingress_to_server({"fromEndpoints": [peer]})],
        [probe("prod/client", "default/server"), probe("default/client", "default/server")],
    )
    assert allowed(v) == [True, False]


def test_cnp_from_endpoints_namespace_label_key_selects_other_namespaces() -> None:
    peer = {"matchLabels": {"io.cilium.k8s.namespace.labels.team": "payments"}}
    v = run(
        PODS,
        [ingress_to_server({"fromEndpoints": [peer]})],
        [probe("prod/client", "default/server"), probe("default/client", "default/server")],
        namespaces=NAMESPACES,
    )
    assert allowed(v) == [True, False]


def test_namespace_metadata_name_label_is_a_namespace_label() -> None:
    # Kubernetes >= 1.21 labels every namespace kubernetes.io/metadata.name=<ns>; it survives the filter.
    peer = {"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "prod"}}
    v = run(
        PODS,
        [ingress_to_server({"fromEndpoints": [peer]})],
        [probe("prod/client", "default/server"), probe("default/client", "default/server")],
    )
    assert allowed(v) == [True, False]


def test_ccnp_empty_endpoint_selector_selects_pods_of_every_namespace() -> None:
    v = run(
        PODS,
        [ccnp("lockdown", {"endpointSelector": {}, "ingress": [{}]})],
        [probe("default/client", "default/server"), probe("default/client", "prod/server")],
    )
    assert allowed(v) == [False, False]
    assert all(x.reason.startswith("default-deny") for x in v)


def test_ccnp_from_endpoints_empty_selects_pods_of_all_namespaces_only() -> None:
    policy = ccnp("from-pods", {"endpointSelector": sel(app="server"), "ingress": [{"fromEndpoints": [{}]}]})
    v = run(
        PODS,
        [policy],
        [
            probe("default/client", "default/server"),
            probe("prod/client", "default/server"),
            probe("default/client", "prod/server"),
            probe({"entity": "remote-node"}, "default/server"),
            probe(OUTSIDE, "default/server"),
        ],
    )
    assert allowed(v) == [True, True, True, False, False]


def test_ccnp_from_endpoints_empty_does_not_select_host_identity() -> None:
    # The host is still let in by allow-localhost; with it off, only the selector counts.
    from cilia.policy.context import PolicyOptions

    policy = ccnp("from-pods", {"endpointSelector": sel(app="server"), "ingress": [{"fromEndpoints": [{}]}]})
    v = run(
        PODS,
        [policy],
        [probe({"entity": "host"}, "default/server")],
        options=PolicyOptions(allow_localhost=False),
    )
    assert v[0].allowed is False


def test_namespace_labels_select_peers_in_ccnp() -> None:
    policy = ccnp(
        "payments-only",
        {
            "endpointSelector": sel(app="server"),
            "ingress": [{"fromEndpoints": [sel(**{"io.cilium.k8s.namespace.labels.team": "payments"})]}],
        },
    )
    v = run(
        PODS,
        [policy],
        [probe("prod/client", "default/server"), probe("default/client", "default/server")],
        namespaces=NAMESPACES,
    )
    assert allowed(v) == [True, False]


def test_namespace_labels_select_subjects() -> None:
    policy = ccnp(
        "lock-payments",
        {"endpointSelector": sel(**{"io.cilium.k8s.namespace.labels.team": "payments"}), "ingress": [{}]},
    )
    v = run(
        PODS,
        [policy],
        [probe("default/client", "prod/server"), probe("default/client", "default/server")],
        namespaces=NAMESPACES,
    )
    assert allowed(v) == [False, True]


def test_service_account_label_selects_pods() -> None:
    pods = [
        pod("client", "10.0.1.1", {"app": "client"}, service_account="frontend"),
        pod("other", "10.0.1.3", {"app": "client"}, service_account="batch"),
        pod("server", "10.0.1.2", {"app": "server"}),
    ]
    peer = sel(**{"io.cilium.k8s.policy.serviceaccount": "frontend"})
    v = run(
        pods,
        [ingress_to_server({"fromEndpoints": [peer]})],
        [probe("default/client", "default/server"), probe("default/other", "default/server")],
    )
    assert allowed(v) == [True, False]


# --- identity label filter ---------------------------------------------------------------------


def test_label_filter_drops_pod_template_hash_and_controller_revision_hash() -> None:
    kept = identity_labels(
        [
            Label("k8s", "app", "web"),
            Label("k8s", "pod-template-hash", "5d8f"),
            Label("k8s", "controller-revision-hash", "77c"),
        ]
    )
    assert kept == LabelSet([Label("k8s", "app", "web")])


def test_label_filter_keeps_app_kubernetes_io_and_namespace_but_drops_other_kubernetes_io() -> None:
    kept = identity_labels(
        [
            Label("k8s", "app.kubernetes.io/name", "web"),
            Label("k8s", "io.kubernetes.pod.namespace", "default"),
            Label("k8s", "io.kubernetes.pod.name", "web-1"),
            Label("k8s", "kubernetes.io/hostname", "node1"),
            Label("k8s", "statefulset.kubernetes.io/pod-name", "web-0"),
        ]
    )
    assert kept == LabelSet(
        [
            Label("k8s", "app.kubernetes.io/name", "web"),
            Label("k8s", "io.kubernetes.pod.namespace", "default"),
        ]
    )


def test_selector_on_pod_template_hash_selects_nothing() -> None:
    pods = [*PODS, pod("web", "10.0.1.9", {"app": "web", "pod-template-hash": "abc123"})]
    v = run(
        pods,
        [ingress_to_server({"fromEndpoints": [sel(**{"pod-template-hash": "abc123"})]})],
        [probe("default/web", "default/server")],
    )
    assert v[0].allowed is False


def test_subject_selector_on_controller_revision_hash_selects_no_endpoint() -> None:
    pods = [pod("ds", "10.0.1.9", {"app": "ds", "controller-revision-hash": "6b7"}), *PODS]
    policy = cnp("lock", {"endpointSelector": sel(**{"controller-revision-hash": "6b7"}), "ingress": [{}]})
    v = run(pods, [policy], [probe("default/client", "default/ds")])
    assert v[0].allowed is True
    assert v[0].reason.startswith("default-allow")


def test_app_kubernetes_io_label_is_selectable() -> None:
    pods = [*PODS, pod("web", "10.0.1.9", {"app.kubernetes.io/name": "web"})]
    v = run(
        pods,
        [ingress_to_server({"fromEndpoints": [sel(**{"app.kubernetes.io/name": "web"})]})],
        [probe("default/web", "default/server"), probe("default/client", "default/server")],
    )
    assert allowed(v) == [True, False]


# --- identities --------------------------------------------------------------------------------


def test_same_label_set_gets_same_identity() -> None:
    inv = Inventory(
        [
            Workload("default", "a-1", {"app": "a"}),
            Workload("default", "a-2", {"app": "a"}),
            Workload("default", "b", {"app": "b"}),
        ]
    )
    a1, a2, b = (inv.identity_of(inv.workloads[k]) for k in ("default/a-1", "default/a-2", "default/b"))
    assert a1 == a2
    assert a1 != b


def test_cluster_identities_are_numbered_from_256() -> None:
    inv = Inventory([Workload("default", "a", {"app": "a"}), Workload("default", "b", {"app": "b"})])
    ids = sorted(inv.identity_of(w) for w in inv.workloads.values())
    assert ids[0] == 256 == identity.MIN_CLUSTER_IDENTITY
    assert ids[1] > 256


def test_same_labels_in_different_namespaces_get_different_identities() -> None:
    inv = Inventory([Workload("default", "a", {"app": "a"}), Workload("prod", "a", {"app": "a"})])
    assert inv.identity_of(inv.workloads["default/a"]) != inv.identity_of(inv.workloads["prod/a"])


def test_pod_template_hash_does_not_split_identity() -> None:
    inv = Inventory(
        [
            Workload("default", "a-1", {"app": "a", "pod-template-hash": "111"}),
            Workload("default", "a-2", {"app": "a", "pod-template-hash": "222"}),
        ]
    )
    assert inv.identity_of(inv.workloads["default/a-1"]) == inv.identity_of(inv.workloads["default/a-2"])


def test_reserved_identity_numbers() -> None:
    assert identity.RESERVED == {
        "host": 1,
        "world": 2,
        "unmanaged": 3,
        "health": 4,
        "init": 5,
        "remote-node": 6,
        "kube-apiserver": 7,
        "ingress": 8,
        "world-ipv4": 9,
        "world-ipv6": 10,
    }


def test_kube_apiserver_identity_carries_remote_node_label() -> None:
    ids = reserved_identities()
    assert Label("reserved", "kube-apiserver") in ids[7]
    assert Label("reserved", "remote-node") in ids[7]
    assert Label("reserved", "kube-apiserver") not in ids[6]


# --- entities ----------------------------------------------------------------------------------


def entity_probes() -> list[dict]:
    return [
        probe("default/client", {"entity": "host"}),
        probe("default/client", {"entity": "remote-node"}),
        probe("default/client", {"entity": "kube-apiserver"}),
        probe("default/client", {"entity": "world"}),
        probe("default/client", OUTSIDE),
        probe("default/client", "default/server"),
        probe("default/client", "prod/server"),
        probe("default/client", {"entity": "health"}),
    ]


def egress_entities(*names: str) -> list[bool]:
    return allowed(run(PODS, [egress_from_client({"toEntities": list(names)})], entity_probes()))


def test_entity_host_selects_only_the_host() -> None:
    assert egress_entities("host") == [True, False, False, False, False, False, False, False]


def test_entity_remote_node_selects_remote_nodes_and_kube_apiserver() -> None:
    # Identity 7 (kube-apiserver) carries reserved:remote-node too.
    assert egress_entities("remote-node") == [False, True, True, False, False, False, False, False]


def test_entity_kube_apiserver_selects_only_kube_apiserver() -> None:
    assert egress_entities("kube-apiserver") == [False, False, True, False, False, False, False, False]


def test_entity_world_selects_outside_addresses_only() -> None:
    assert egress_entities("world") == [False, False, False, True, True, False, False, False]


def test_entity_world_selects_cidr_identities() -> None:
    # With a toCIDR rule naming 203.0.113.0/24 the address has a CIDR identity; it still carries reserved:world.
    cidr_rule = cnp(
        "cidr", {"endpointSelector": sel(app="other"), "egress": [{"toCIDR": ["203.0.113.0/24"]}]}
    )
    v = run(
        PODS, [egress_from_client({"toEntities": ["world"]}), cidr_rule], [probe("default/client", OUTSIDE)]
    )
    assert v[0].allowed is True


def test_entity_cluster_selects_pods_host_and_nodes_but_not_world() -> None:
    assert egress_entities("cluster") == [True, True, True, False, False, True, True, True]


def test_entity_all_selects_everything_including_world() -> None:
    assert egress_entities("all") == [True] * 8


def test_entity_none_selects_nothing() -> None:
    assert egress_entities("none") == [False] * 8


def test_entity_health_selects_health_endpoints_only() -> None:
    assert egress_entities("health") == [False, False, False, False, False, False, False, True]


def test_entity_world_ipv4_selects_nothing_in_single_stack() -> None:
    # Single stack: outside IPv4 addresses get identity 2 (reserved:world), not world-ipv4 (9).
    assert egress_entities("world-ipv4") == [False] * 8


def test_from_entities_world_allows_ingress_from_outside_only() -> None:
    v = run(
        PODS,
        [ingress_to_server({"fromEntities": ["world"]})],
        [
            probe(OUTSIDE, "default/server"),
            probe({"entity": "remote-node"}, "default/server"),
            probe("default/client", "default/server"),
        ],
    )
    assert allowed(v) == [True, False, False]
