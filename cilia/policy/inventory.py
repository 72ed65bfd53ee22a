"""What the engine knows of the cluster: endpoints (pods), namespaces, services, and identities.

An endpoint's identity labels are derived as Cilium derives them: its Kubernetes labels (through
the shared label filter) plus `io.kubernetes.pod.namespace`, the namespace's labels as
`io.cilium.k8s.namespace.labels.*`, `io.cilium.k8s.policy.serviceaccount` and
`io.cilium.k8s.policy.cluster`. Identities are numbered as the identity service would: the same
label set always gets the same number.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cilia.identity import MIN_CLUSTER_IDENTITY, RESERVED, reserved_labels
from cilia.labelfilter import identity_labels
from cilia.labels import (
    CLUSTER,
    DEFAULT_CLUSTER_NAME,
    NAMESPACE_LABELS_PREFIX,
    POD_NAMESPACE,
    SERVICE_ACCOUNT,
    SOURCE_K8S,
    SOURCE_RESERVED,
    Label,
    LabelSet,
)
from cilia.policy.l4 import PROTO_TCP, proto_number
from cilia.policy.rules import IPAddress

NamedPorts = Mapping[str, tuple[int, int]]  # name -> (port, protocol number)


@dataclass(frozen=True)
class Workload:
    """An endpoint as the engine sees it: a pod with labels, an address and named ports."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ip: IPAddress | None = None
    named_ports: NamedPorts = field(default_factory=dict)
    service_account: str = "default"
    node: str | None = None
    identity: int | None = None  # the identity service's number, when known

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServiceInfo:
    """A Kubernetes Service, as far as `toServices` needs it."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    selector: Mapping[str, str] | None = None


def parse_named_ports(ports: Mapping[str, int | str]) -> dict[str, tuple[int, int]]:
    """`{http: 80, dns: "53/UDP"}` -> name -> (port, protocol); the protocol defaults to TCP."""
    out: dict[str, tuple[int, int]] = {}
    for name, value in ports.items():
        if isinstance(value, int):
            number, proto = value, PROTO_TCP
        else:
            num, _, pname = str(value).partition("/")
            number, proto = int(num), proto_number(pname) if pname else PROTO_TCP
        if not 1 <= number <= 65535:
            raise ValueError(f"{name}: port {number} is not 1-65535")
        out[name.lower()] = (number, proto)
    return out


def workload_identity_labels(
    w: Workload, namespace_labels: Mapping[str, str] | None = None, cluster: str = DEFAULT_CLUSTER_NAME
) -> LabelSet:
    """The security-relevant labels of a pod, derived as Cilium derives them."""
    labels = [Label(SOURCE_K8S, k, v) for k, v in w.labels.items()]
    labels.append(Label(SOURCE_K8S, POD_NAMESPACE, w.namespace))
    ns_labels = {"kubernetes.io/metadata.name": w.namespace, **(namespace_labels or {})}
    labels += [Label(SOURCE_K8S, NAMESPACE_LABELS_PREFIX + k, v) for k, v in ns_labels.items()]
    labels.append(Label(SOURCE_K8S, SERVICE_ACCOUNT, w.service_account))
    labels.append(Label(SOURCE_K8S, CLUSTER, cluster))
    return identity_labels(labels)


class Inventory:
    """Endpoints, namespaces and services, with identities numbered from 256 by label set."""

    def __init__(
        self,
        workloads: Iterable[Workload] = (),
        namespaces: Mapping[str, Mapping[str, str]] | None = None,
        services: Iterable[ServiceInfo] = (),
        cluster: str = DEFAULT_CLUSTER_NAME,
        node_labels: Mapping[str, str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.namespaces: dict[str, dict[str, str]] = {k: dict(v) for k, v in (namespaces or {}).items()}
        self.workloads: dict[str, Workload] = {}
        self.by_ip: dict[IPAddress, Workload] = {}
        self.services: dict[tuple[str, str], ServiceInfo] = {(s.namespace, s.name): s for s in services}
        self.node_labels = dict(node_labels or {})
        self._labels: dict[str, LabelSet] = {}
        self._ids_by_labels: dict[LabelSet, int] = {}
        self._next_id = MIN_CLUSTER_IDENTITY
        for w in workloads:
            self.add(w)

    def add(self, w: Workload) -> None:
        self.workloads[w.key] = w
        if w.ip is not None:
            self.by_ip[w.ip] = w
        labels = workload_identity_labels(w, self.namespaces.get(w.namespace), self.cluster)
        self._labels[w.key] = labels
        if w.identity is not None:
            self._ids_by_labels[labels] = w.identity
            self._next_id = max(self._next_id, w.identity + 1)
        elif labels not in self._ids_by_labels:
            while self._next_id in self._ids_by_labels.values():
                self._next_id += 1
            self._ids_by_labels[labels] = self._next_id
            self._next_id += 1

    def labels_of(self, w: Workload) -> LabelSet:
        return self._labels[w.key]

    def identity_of(self, w: Workload) -> int:
        return self._ids_by_labels[self._labels[w.key]]

    def cluster_identities(self) -> dict[int, LabelSet]:
        return {i: labels for labels, i in self._ids_by_labels.items()}

    def host_labels(self) -> LabelSet:
        """The local host: `reserved:host` plus the node's labels (for `nodeSelector`)."""
        return LabelSet(
            [Label(SOURCE_RESERVED, "host"), *(Label(SOURCE_K8S, k, v) for k, v in self.node_labels.items())]
        )

    def remote_node_labels(self) -> LabelSet:
        return LabelSet(
            [
                Label(SOURCE_RESERVED, "remote-node"),
                *(Label(SOURCE_K8S, k, v) for k, v in self.node_labels.items()),
            ]
        )

    def egress_named_port(self, name: str, proto: int) -> int | None:
        """Cilium (<= 1.18) resolves egress named ports cluster-wide: one number, or nothing."""
        ports = {
            p
            for w in self.workloads.values()
            for n, (p, pr) in w.named_ports.items()
            if n == name and pr == proto and p
        }
        return ports.pop() if len(ports) == 1 else None


def reserved_identities() -> dict[int, LabelSet]:
    """Reserved identities and their labels (kube-apiserver also carries `reserved:remote-node`)."""
    out = {num: reserved_labels(name) for name, num in RESERVED.items()}
    out[RESERVED["kube-apiserver"]] = LabelSet(
        [*out[RESERVED["kube-apiserver"]], Label(SOURCE_RESERVED, "remote-node")]
    )
    return out


def parse_ip(text: str | None) -> IPAddress | None:
    return None if text in (None, "") else ipaddress.ip_address(text)
