"""Resource parsing: the loader (YAML/JSON, documents, error lines) and the resource models."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from cilia.errors import PolicyError, ResourceError
from cilia.models import (
    CiliumClusterwideNetworkPolicy,
    CiliumNetworkPolicy,
    NetworkPolicy,
    load_documents,
    parse_resources,
    resource_key,
)
from cilia.models import cilium as cm

SEL = {"matchLabels": {"app": "a"}}


def cnp(
    spec: dict[str, Any], name: str | None = "rule1", kind: str = "CiliumNetworkPolicy", **meta: Any
) -> dict:
    metadata: dict[str, Any] = dict(meta)
    if name is not None:
        metadata["name"] = name
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": metadata, "spec": spec}


def knp(spec: dict[str, Any], name: str = "np1", namespace: str = "ns1") -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def dump(*docs: dict) -> str:
    return yaml.safe_dump_all(list(docs), sort_keys=False)


def errors(text: str) -> list[PolicyError]:
    with pytest.raises(ResourceError) as info:
        parse_resources(text)
    return info.value.errors


def lines(text: str) -> list[str]:
    return [e.line() for e in errors(text)]


def valid_rule(**extra: Any) -> dict:
    return {"endpointSelector": SEL, "ingress": [{}], **extra}


def bad_port_spec() -> dict:
    return {"endpointSelector": SEL, "ingress": [{"toPorts": [{"ports": [{"port": "99999"}]}]}]}


BAD_PORT_PATH = "spec.ingress[0].toPorts[0].ports[0].port"
BAD_PORT_MSG = "must be 0-65535 or a port name"


# --- input formats ---------------------------------------------------------------------------


def test_loader_multi_document_yaml_parses_every_document():
    text = dump(cnp(valid_rule(), "a"), cnp(valid_rule(), "b"), knp({"podSelector": {}}))
    objs = parse_resources(text)
    assert [type(o).__name__ for o in objs] == ["CiliumNetworkPolicy", "CiliumNetworkPolicy", "NetworkPolicy"]
    assert [o.metadata.name for o in objs] == ["a", "b", "np1"]


def test_loader_skips_empty_yaml_documents():
    text = "---\n" + dump(cnp(valid_rule(), "a")) + "---\n---\n"
    assert [o.metadata.name for o in parse_resources(text)] == ["a"]


def test_loader_json_object():
    objs = parse_resources(json.dumps(cnp(valid_rule(), "j1")))
    assert len(objs) == 1
    assert isinstance(objs[0], CiliumNetworkPolicy)
    assert objs[0].metadata.name == "j1"


def test_loader_json_list():
    objs = parse_resources(json.dumps([cnp(valid_rule(), "j1"), cnp(valid_rule(), "j2")]))
    assert [o.metadata.name for o in objs] == ["j1", "j2"]


def test_loader_kind_list_is_flattened():
    lst = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [cnp(valid_rule(), "l1"), knp({"podSelector": {}}, "l2")],
    }
    objs = parse_resources(dump(lst))
    assert [(o.kind, o.metadata.name) for o in objs] == [
        ("CiliumNetworkPolicy", "l1"),
        ("NetworkPolicy", "l2"),
    ]


def test_loader_kind_list_in_json():
    lst = {"apiVersion": "v1", "kind": "List", "items": [cnp(valid_rule(), "l1"), cnp(valid_rule(), "l2")]}
    assert [o.metadata.name for o in parse_resources(json.dumps(lst))] == ["l1", "l2"]


def test_load_documents_flattens_list_between_other_documents():
    lst = {"kind": "List", "items": [{"a": 1}, {"b": 2}]}
    assert load_documents(dump({"x": 0}, lst, {"y": 3})) == [{"x": 0}, {"a": 1}, {"b": 2}, {"y": 3}]


# --- error lines: document and field path ------------------------------------------------------


def test_error_names_cnp_document_and_field_path():
    (err,) = errors(dump(cnp(bad_port_spec())))
    assert err.document == "CiliumNetworkPolicy default/rule1"
    assert err.path == BAD_PORT_PATH
    assert err.line() == f"CiliumNetworkPolicy default/rule1: {BAD_PORT_PATH}: {BAD_PORT_MSG}"


def test_error_names_cnp_explicit_namespace():
    (err,) = errors(dump(cnp(bad_port_spec(), namespace="prod")))
    assert err.document == "CiliumNetworkPolicy prod/rule1"


def test_error_names_ccnp_without_namespace():
    (err,) = errors(dump(cnp(bad_port_spec(), "cw", kind="CiliumClusterwideNetworkPolicy")))
    assert err.line() == f"CiliumClusterwideNetworkPolicy cw: {BAD_PORT_PATH}: {BAD_PORT_MSG}"


def test_error_names_networkpolicy_namespace_and_name():
    doc = knp({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}, "np1", "ns1")
    (err,) = errors(dump(doc))
    assert err.document == "NetworkPolicy ns1/np1"
    assert (
        err.line() == "NetworkPolicy ns1/np1: spec.ingress[0].ports[0].port: must be 1-65535 or a port name"
    )


def test_error_names_document_by_index_when_unnamed():
    text = dump(cnp(valid_rule(), "ok"), cnp(bad_port_spec(), name=None))
    (err,) = errors(text)
    assert "document 2" in err.document
    assert err.document.startswith("CiliumNetworkPolicy")
    assert err.path == BAD_PORT_PATH


def test_error_names_document_by_index_when_not_a_mapping():
    (err,) = errors(dump(cnp(valid_rule(), "ok")) + "---\n- just\n- a list\n")
    assert err.document == "document 2"
    assert err.line() == "document 2: a document must be a mapping with apiVersion and kind"


def test_error_missing_apiversion_and_kind():
    (err,) = errors("metadata: {name: x}\n")
    assert err.message == "apiVersion and kind are required"
    assert err.document == "document 1 (default/x)"


def test_unknown_field_error():
    spec = {"endpointSelector": SEL, "ingress": [{"fromEndpoint": [SEL]}]}
    assert lines(dump(cnp(spec))) == [
        "CiliumNetworkPolicy default/rule1: unknown field: spec.ingress[0].fromEndpoint"
    ]


def test_unknown_top_level_field_error():
    doc = cnp(valid_rule())
    doc["extra"] = 1
    assert lines(dump(doc)) == ["CiliumNetworkPolicy default/rule1: unknown field: extra"]


def test_unknown_field_in_networkpolicy():
    doc = knp({"podSelector": {}, "ingres": []})
    assert lines(dump(doc)) == ["NetworkPolicy ns1/np1: unknown field: spec.ingres"]


# Each unimplemented Cilium field, at a place where Cilium accepts it, and the path reported.
_PORTS = [{"port": "80", "protocol": "TCP"}]
UNSUPPORTED = {
    "fromRequires": ({"ingress": [{"fromRequires": [SEL]}]}, "spec.ingress[0].fromRequires"),
    "toRequires": ({"egress": [{"toRequires": [SEL]}]}, "spec.egress[0].toRequires"),
    "toGroups": (
        {"egress": [{"toGroups": [{"aws": {"securityGroupsIds": ["sg-1"]}}]}]},
        "spec.egress[0].toGroups",
    ),
    "fromGroups": (
        {"ingress": [{"fromGroups": [{"aws": {"securityGroupsIds": ["sg-1"]}}]}]},
        "spec.ingress[0].fromGroups",
    ),
    "fromNodes": ({"ingress": [{"fromNodes": [SEL]}]}, "spec.ingress[0].fromNodes"),
    "toNodes": ({"egress": [{"toNodes": [SEL]}]}, "spec.egress[0].toNodes"),
    "serverNames": (
        {"egress": [{"toPorts": [{"ports": _PORTS, "serverNames": ["a.example.com"]}]}]},
        "spec.egress[0].toPorts[0].serverNames",
    ),
    "terminatingTLS": (
        {"egress": [{"toPorts": [{"ports": _PORTS, "terminatingTLS": {"secret": {"name": "s"}}}]}]},
        "spec.egress[0].toPorts[0].terminatingTLS",
    ),
    "originatingTLS": (
        {"egress": [{"toPorts": [{"ports": _PORTS, "originatingTLS": {"secret": {"name": "s"}}}]}]},
        "spec.egress[0].toPorts[0].originatingTLS",
    ),
    "listener": (
        {
            "egress": [
                {
                    "toPorts": [
                        {
                            "ports": _PORTS,
                            "listener": {
                                "envoyConfig": {"kind": "CiliumEnvoyConfig", "name": "e"},
                                "name": "l",
                            },
                        }
                    ]
                }
            ]
        },
        "spec.egress[0].toPorts[0].listener",
    ),
    "rules.kafka": (
        {"egress": [{"toPorts": [{"ports": _PORTS, "rules": {"kafka": [{"topic": "t"}]}}]}]},
        "spec.egress[0].toPorts[0].rules.kafka",
    ),
    "rules.l7proto": (
        {"egress": [{"toPorts": [{"ports": _PORTS, "rules": {"l7proto": "envoy.binarymemcache"}}]}]},
        "spec.egress[0].toPorts[0].rules.l7proto",
    ),
    "cidrGroupRef": (
        {"ingress": [{"fromCIDRSet": [{"cidrGroupRef": "my-group"}]}]},
        "spec.ingress[0].fromCIDRSet[0].cidrGroupRef",
    ),
    "headerMatches.secret": (
        {
            "ingress": [
                {
                    "toPorts": [
                        {
                            "ports": _PORTS,
                            "rules": {
                                "http": [{"headerMatches": [{"name": "X-Key", "secret": {"name": "s"}}]}]
                            },
                        }
                    ]
                }
            ]
        },
        "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].secret",
    ),
    "authentication.mode required": (
        {"ingress": [{"fromEndpoints": [SEL], "authentication": {"mode": "required"}}]},
        "spec.ingress[0].authentication.mode",
    ),
}


@pytest.mark.parametrize("field", list(UNSUPPORTED))
def test_unimplemented_field_is_not_supported_by_cilia(field: str):
    sections, path = UNSUPPORTED[field]
    errs = errors(dump(cnp({"endpointSelector": SEL, **sections})))
    assert [e.line() for e in errs] == [f"CiliumNetworkPolicy default/rule1: not supported by cilia: {path}"]
    assert errs[0].path == path


def test_authentication_mode_disabled_is_accepted():
    spec = {
        "endpointSelector": SEL,
        "ingress": [{"fromEndpoints": [SEL], "authentication": {"mode": "disabled"}}],
    }
    (obj,) = parse_resources(dump(cnp(spec)))
    assert obj.spec.ingress[0].authentication.mode == "disabled"


def test_batch_with_one_bad_document_rejects_all():
    text = dump(cnp(bad_port_spec(), "bad1"), cnp(valid_rule(), "good"), cnp(bad_port_spec(), "bad2"))
    result: list = []
    with pytest.raises(ResourceError) as info:
        result = parse_resources(text)
    assert result == []
    assert [e.document for e in info.value.errors] == [
        "CiliumNetworkPolicy default/bad1",
        "CiliumNetworkPolicy default/bad2",
    ]
    assert (
        str(info.value)
        == f"CiliumNetworkPolicy default/bad1: {BAD_PORT_PATH}: {BAD_PORT_MSG} (and 1 more error)"
    )


def test_one_document_reports_every_error():
    spec = {
        "endpointSelector": SEL,
        "ingress": [{"fromEndpoint": [SEL]}],
        "egress": [{"toPorts": [{"ports": [{"port": "99999"}]}]}],
    }
    assert lines(dump(cnp(spec))) == [
        f"CiliumNetworkPolicy default/rule1: spec.egress[0].toPorts[0].ports[0].port: {BAD_PORT_MSG}",
        "CiliumNetworkPolicy default/rule1: unknown field: spec.ingress[0].fromEndpoint",
    ]


def test_unknown_kind_names_the_document():
    (err,) = errors("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: web}\n")
    assert err.document == "Pod web/p"
    assert err.path == "kind"
    assert err.message.startswith("unknown kind 'Pod'")
    assert "CiliumNetworkPolicy" in err.message


def test_unknown_apiversion_for_known_kind():
    doc = cnp(valid_rule())
    doc["apiVersion"] = "cilium.io/v1"
    assert lines(dump(doc)) == [
        "CiliumNetworkPolicy default/rule1: apiVersion: unsupported apiVersion 'cilium.io/v1' for kind CiliumNetworkPolicy"
    ]


def test_yaml_syntax_error_is_one_line():
    with pytest.raises(ResourceError) as info:
        parse_resources("apiVersion: cilium.io/v2\nkind: [\n  spec: x\n", origin="bad.yaml")
    (err,) = info.value.errors
    assert (err.path, err.document) == ("", "")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("cannot parse bad.yaml: ")
    assert "line 2" in str(info.value)


def test_json_syntax_error_is_one_line():
    with pytest.raises(ResourceError) as info:
        parse_resources('{"apiVersion": ', origin="bad.json")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("cannot parse bad.json: ")


def test_wrong_types_give_readable_messages():
    spec = {"endpointSelector": SEL, "ingress": "everything"}
    assert lines(dump(cnp(spec))) == ["CiliumNetworkPolicy default/rule1: spec.ingress: must be a list"]


def test_cnp_without_spec_or_specs_rejected():
    doc = cnp(valid_rule())
    del doc["spec"]
    assert lines(dump(doc)) == ["CiliumNetworkPolicy default/rule1: spec: one of spec or specs is required"]


def test_invalid_metadata_name_rejected():
    (err,) = errors(dump(cnp(valid_rule(), "Not_Valid")))
    assert err.path == "metadata.name"
    assert err.message == "must be a lowercase DNS subdomain (a-z, 0-9, '-', '.')"


def test_invalid_selector_label_key_rejected():
    spec = {"endpointSelector": {"matchLabels": {"bad key": "x"}}, "ingress": [{}]}
    (err,) = errors(dump(cnp(spec)))
    assert err.path == "spec.endpointSelector.matchLabels"
    assert err.message.startswith("invalid label key 'bad key'")


def test_match_expression_in_without_values_rejected():
    spec = {"endpointSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}, "ingress": [{}]}
    (err,) = errors(dump(cnp(spec)))
    assert err.path == "spec.endpointSelector.matchExpressions[0].values"
    assert err.message == "must be non-empty when operator is In"


def test_resource_key_defaults_namespace_and_ccnp_is_cluster_scoped():
    objs = parse_resources(
        dump(cnp(valid_rule(), "a"), cnp(valid_rule(), "b", kind="CiliumClusterwideNetworkPolicy"))
    )
    assert [resource_key(o) for o in objs] == [
        ("CiliumNetworkPolicy", "default", "a"),
        ("CiliumClusterwideNetworkPolicy", "", "b"),
    ]


# --- every field of the CRD ---------------------------------------------------------------------

EVERYTHING = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: everything
  namespace: prod
  labels: {team: net}
  annotations: {note: "all fields"}
spec:
  description: every implemented field of a Cilium rule
  endpointSelector:
    matchLabels: {app: api, "k8s:tier": backend}
    matchExpressions:
      - {key: env, operator: In, values: [prod, staging]}
      - {key: canary, operator: DoesNotExist}
  labels:
    - {key: owner, value: net, source: k8s}
  enableDefaultDeny: {ingress: true, egress: false}
  log: {value: api-policy}
  ingress:
    - fromEndpoints:
        - matchLabels: {role: frontend}
      toPorts:
        - ports:
            - {port: "8080", protocol: TCP}
            - {port: HTTP-Alt, protocol: TCP}
          rules:
            http:
              - method: GET
                path: "/v1/.*"
                host: "api\\\\.example\\\\.com"
                headers: ["X-Token"]
                headerMatches:
                  - {name: X-Env, value: prod, mismatch: LOG}
                  - {name: X-Trace, value: "1", mismatch: ADD}
                  - {name: X-Old, mismatch: DELETE}
                  - {name: X-New, value: v, mismatch: REPLACE}
      authentication: {mode: disabled}
    - fromCIDR: ["192.0.2.0/24", "198.51.100.7"]
      toPorts:
        - ports:
            - {port: "9000", endPort: 9100, protocol: udp}
            - {port: "0", protocol: SCTP}
    - fromCIDRSet:
        - {cidr: 10.0.0.0/8, except: [10.96.0.0/12, 10.1.0.0/16]}
      icmps:
        - fields:
            - {family: IPv4, type: EchoRequest}
            - {type: 0}
            - {family: IPv6, type: PacketTooBig}
            - {family: IPv6, type: "128"}
    - fromEntities: [world-ipv4, world-ipv6, cluster, host, remote-node, kube-apiserver, health, init,
                     unmanaged, ingress, none, all, world]
  ingressDeny:
    - fromEndpoints:
        - matchLabels: {role: attacker}
      toPorts:
        - ports: [{port: "22", protocol: TCP}]
    - fromCIDR: ["203.0.113.0/24"]
      icmps:
        - fields: [{type: Timestamp}]
  egress:
    - toEndpoints:
        - matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules:
            dns:
              - matchName: api.github.com
              - matchPattern: "*.example.com"
    - toFQDNs:
        - matchName: api.github.com
        - matchPattern: "*.github.com"
      toPorts:
        - ports: [{port: "443", protocol: TCP}]
    - toServices:
        - k8sService: {serviceName: db, namespace: prod}
        - k8sServiceSelector:
            selector: {matchLabels: {svc: cache}}
            namespace: prod
    - toCIDR: ["2001:db8::/32"]
    - toCIDRSet:
        - cidr: 0.0.0.0/0
          except: [10.0.0.0/8]
    - toEntities: [world-ipv4]
      authentication: {mode: disabled}
  egressDeny:
    - toEntities: [world-ipv6]
      toPorts:
        - ports: [{port: "25"}]
    - toCIDRSet: [{cidr: 169.254.0.0/16}]
specs:
  - endpointSelector: {}
    egress: [{}]
    description: second rule
status:
  conditions: []
"""


def test_every_implemented_cnp_field_parses():
    (obj,) = parse_resources(EVERYTHING)
    assert isinstance(obj, CiliumNetworkPolicy)
    assert obj.metadata.namespace == "prod"
    assert obj.metadata.labels == {"team": "net"}
    spec = obj.spec
    assert spec.description == "every implemented field of a Cilium rule"
    assert spec.labels[0].model_dump() == {"key": "owner", "value": "net", "source": "k8s"}
    assert (spec.enableDefaultDeny.ingress, spec.enableDefaultDeny.egress) == (True, False)
    assert spec.log.value == "api-policy"
    assert [r.operator for r in spec.endpointSelector.matchExpressions] == ["In", "DoesNotExist"]
    # ingress[0]: endpoints + HTTP with headerMatches
    http = spec.ingress[0].toPorts[0].rules.http[0]
    assert (http.method, http.path, http.host, http.headers) == (
        "GET",
        "/v1/.*",
        "api\\.example\\.com",
        ["X-Token"],
    )
    assert [(h.name, h.mismatch) for h in http.headerMatches] == [
        ("X-Env", "LOG"),
        ("X-Trace", "ADD"),
        ("X-Old", "DELETE"),
        ("X-New", "REPLACE"),
    ]
    assert spec.ingress[0].toPorts[0].ports[1].port == "http-alt"  # named ports are lower-cased
    # ingress[1]: CIDR (a bare address is a /32), endPort, lower-case protocol
    assert spec.ingress[1].fromCIDR == ["192.0.2.0/24", "198.51.100.7/32"]
    pp = spec.ingress[1].toPorts[0].ports[0]
    assert (pp.port, pp.endPort, pp.protocol) == ("9000", 9100, "UDP")
    assert spec.ingress[1].toPorts[0].ports[1].port == "0"
    # ingress[2]: CIDR set with except, ICMP names and numbers per family
    assert spec.ingress[2].fromCIDRSet[0].except_ == ["10.96.0.0/12", "10.1.0.0/16"]
    assert [f.type_number for f in spec.ingress[2].icmps[0].fields] == [8, 0, 2, 128]
    assert [f.family for f in spec.ingress[2].icmps[0].fields] == ["IPv4", "IPv4", "IPv6", "IPv6"]
    # ingress[3]: every entity of Cilium's EntitySelectorMapping, world-ipv4/ipv6 included
    assert set(spec.ingress[3].fromEntities) == set(cm.ENTITIES)
    # deny sections
    assert spec.ingressDeny[0].toPorts[0].ports[0].port == "22"
    assert spec.ingressDeny[1].icmps[0].fields[0].type_number == 13
    assert spec.egressDeny[0].toEntities == ["world-ipv6"]
    assert spec.egressDeny[0].toPorts[0].ports[0].protocol == "ANY"
    # egress: DNS rules, toFQDNs, toServices, CIDRs, entities
    dns = spec.egress[0].toPorts[0].rules.dns
    assert [(d.matchName, d.matchPattern) for d in dns] == [("api.github.com", None), (None, "*.example.com")]
    assert [(f.matchName, f.matchPattern) for f in spec.egress[1].toFQDNs] == [
        ("api.github.com", None),
        (None, "*.github.com"),
    ]
    svc = spec.egress[2].toServices
    assert svc[0].k8sService.serviceName == "db"
    assert svc[1].k8sServiceSelector.selector.matchLabels == {"svc": "cache"}
    assert spec.egress[3].toCIDR == ["2001:db8::/32"]
    assert spec.egress[4].toCIDRSet[0].except_ == ["10.0.0.0/8"]
    assert spec.egress[5].toEntities == ["world-ipv4"]
    # specs
    assert [path for path, _ in obj.rules()] == ["spec", "specs[0]"]
    assert obj.specs[0].description == "second rule"


def test_ccnp_host_policy_with_node_selector_parses():
    spec = {
        "nodeSelector": {"matchLabels": {"node-role": "worker"}},
        "ingress": [
            {"fromEntities": ["remote-node"], "toPorts": [{"ports": [{"port": "22", "protocol": "TCP"}]}]}
        ],
        "egress": [
            {
                "toEndpoints": [SEL],
                "toPorts": [
                    {"ports": [{"port": "53", "protocol": "UDP"}], "rules": {"dns": [{"matchPattern": "*"}]}}
                ],
            }
        ],
    }
    (obj,) = parse_resources(dump(cnp(spec, "host-fw", kind="CiliumClusterwideNetworkPolicy")))
    assert isinstance(obj, CiliumClusterwideNetworkPolicy)
    assert obj.spec.nodeSelector.matchLabels == {"node-role": "worker"}
    assert obj.spec.endpointSelector is None


# The JSON names of each Cilium API type (research notes Q2); every one must be a model field.
CRD_FIELDS = {
    cm.Rule: "endpointSelector nodeSelector ingress ingressDeny egress egressDeny labels enableDefaultDeny "
    "description log",
    cm.IngressRule: "fromEndpoints fromRequires fromCIDR fromCIDRSet fromEntities fromGroups fromNodes toPorts icmps "
    "authentication",
    cm.IngressDenyRule: "fromEndpoints fromRequires fromCIDR fromCIDRSet fromEntities fromGroups fromNodes toPorts icmps",
    cm.EgressRule: "toEndpoints toRequires toCIDR toCIDRSet toEntities toServices toGroups toNodes toPorts icmps "
    "toFQDNs authentication",
    cm.EgressDenyRule: "toEndpoints toRequires toCIDR toCIDRSet toEntities toServices toGroups toNodes toPorts icmps",
    cm.PortRule: "ports terminatingTLS originatingTLS serverNames listener rules",
    cm.PortDenyRule: "ports",
    cm.PortProtocol: "port endPort protocol",
    cm.L7Rules: "http kafka dns l7proto l7",
    cm.PortRuleHTTP: "path method host headers headerMatches",
    cm.HeaderMatch: "mismatch name secret value",
    cm.FQDNSelector: "matchName matchPattern",
    cm.ICMPRule: "fields",
    cm.ICMPField: "family type",
    cm.CIDRRule: "cidr cidrGroupRef cidrGroupSelector except",
    cm.Service: "k8sService k8sServiceSelector",
    cm.K8sServiceNamespace: "serviceName namespace",
    cm.ServiceSelector: "selector namespace",
    cm.DefaultDenyConfig: "ingress egress",
    cm.LogConfig: "value",
    cm.Authentication: "mode",
    cm.CiliumNetworkPolicy: "apiVersion kind metadata spec specs status",
}


@pytest.mark.parametrize("model", list(CRD_FIELDS), ids=lambda m: m.__name__)
def test_model_has_every_crd_field(model: Any):
    names = {f.alias or n for n, f in model.model_fields.items()}
    missing = set(CRD_FIELDS[model].split()) - names
    assert not missing, f"{model.__name__} lacks {sorted(missing)}"


# --- NetworkPolicy ----------------------------------------------------------------------------


def test_networkpolicy_port_numeric_string_rejected():
    (err,) = errors(dump(knp({"podSelector": {}, "ingress": [{"ports": [{"port": "80"}]}]})))
    assert err.path == "spec.ingress[0].ports[0].port"
    assert err.message == "must be an integer or a port name, not a numeric string"


def test_networkpolicy_port_int_and_name_accepted():
    (obj,) = parse_resources(
        dump(knp({"podSelector": {}, "ingress": [{"ports": [{"port": 80}, {"port": "HTTP"}]}]}))
    )
    assert [p.port for p in obj.spec.ingress[0].ports] == ["80", "http"]
    assert [p.protocol for p in obj.spec.ingress[0].ports] == ["TCP", "TCP"]


def test_networkpolicy_endport_below_port_rejected():
    (err,) = errors(dump(knp({"podSelector": {}, "egress": [{"ports": [{"port": 8080, "endPort": 80}]}]})))
    assert err.path == "spec.egress[0].ports[0].endPort"
    assert err.message == "must be greater than or equal to port"


def test_networkpolicy_endport_with_named_port_rejected():
    (err,) = errors(dump(knp({"podSelector": {}, "egress": [{"ports": [{"port": "http", "endPort": 90}]}]})))
    assert err.path == "spec.egress[0].ports[0].endPort"
    assert err.message == "may not be specified when port is not a number"


def test_networkpolicy_ipblock_with_pod_selector_rejected():
    peer = {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}
    (err,) = errors(dump(knp({"podSelector": {}, "ingress": [{"from": [peer]}]})))
    assert err.path == "spec.ingress[0].from[0]"
    assert err.message == "may not specify both ipBlock and another peer"


def test_networkpolicy_empty_peer_rejected():
    (err,) = errors(dump(knp({"podSelector": {}, "egress": [{"to": [{}]}]})))
    assert err.path == "spec.egress[0].to[0]"
    assert err.message == "must specify a peer"


def test_networkpolicy_bad_protocol_rejected():
    (err,) = errors(
        dump(knp({"podSelector": {}, "ingress": [{"ports": [{"port": 53, "protocol": "ICMP"}]}]}))
    )
    assert err.path == "spec.ingress[0].ports[0].protocol"
    assert err.message.startswith("unsupported value 'ICMP'")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"podSelector": {}}, {"Ingress"}),
        ({"podSelector": {}, "ingress": [{}]}, {"Ingress"}),
        ({"podSelector": {}, "egress": [{}]}, {"Ingress", "Egress"}),
        ({"podSelector": {}, "egress": []}, {"Ingress"}),
        ({"podSelector": {}, "egress": [{}], "policyTypes": ["Egress"]}, {"Egress"}),
        ({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}, {"Ingress", "Egress"}),
    ],
    ids=["empty", "ingress-only", "egress-rules", "empty-egress-list", "explicit-egress", "explicit-both"],
)
def test_networkpolicy_effective_policy_types(spec: dict, expected: set[str]):
    (obj,) = parse_resources(dump(knp(spec)))
    assert isinstance(obj, NetworkPolicy)
    assert obj.spec.effective_policy_types() == expected


def test_networkpolicy_duplicate_policy_type_rejected():
    (err,) = errors(dump(knp({"podSelector": {}, "policyTypes": ["Ingress", "Ingress"]})))
    assert err.path == "spec.policyTypes"
    assert err.message == "duplicate policy type"
