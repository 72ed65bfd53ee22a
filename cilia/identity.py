"""Security identities: Cilium's reserved numbers and labels, the cluster and CIDR number ranges.

Reserved identities are never allocated or stored; cluster identities (from labels) start at 256;
CIDR identities are node-local and start at 1<<24 | 1.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cilia.labels import SOURCE_CIDR, SOURCE_RESERVED, Label, LabelSet

HOST = 1
WORLD = 2
UNMANAGED = 3
HEALTH = 4
INIT = 5
REMOTE_NODE = 6
KUBE_APISERVER = 7
INGRESS = 8
WORLD_IPV4 = 9
WORLD_IPV6 = 10

RESERVED: dict[str, int] = {
    "host": HOST,
    "world": WORLD,
    "unmanaged": UNMANAGED,
    "health": HEALTH,
    "init": INIT,
    "remote-node": REMOTE_NODE,
    "kube-apiserver": KUBE_APISERVER,
    "ingress": INGRESS,
    "world-ipv4": WORLD_IPV4,
    "world-ipv6": WORLD_IPV6,
}
RESERVED_NAMES: dict[int, str] = {v: k for k, v in RESERVED.items()}

MIN_CLUSTER_IDENTITY = 256
MAX_CLUSTER_IDENTITY = 65535
MIN_LOCAL_IDENTITY = (1 << 24) | 1
ANY = 0  # "any identity" in map-state keys


@dataclass(frozen=True)
class Identity:
    """A numeric security identity and the labels it stands for."""

    id: int
    labels: LabelSet

    @property
    def is_reserved(self) -> bool:
        return self.id in RESERVED_NAMES

    @property
    def is_cidr(self) -> bool:
        return self.id >= MIN_LOCAL_IDENTITY

    def __str__(self) -> str:
        return str(self.id)


def reserved_labels(name: str) -> LabelSet:
    """The labels of a reserved identity (`reserved:<name>`)."""
    if name not in RESERVED:
        raise KeyError(name)
    return LabelSet((Label(SOURCE_RESERVED, name),))


def reserved_identity(name: str) -> Identity:
    return Identity(RESERVED[name], reserved_labels(name))


def cidr_label_key(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """Cilium's `cidr:` label key for a prefix; IPv6 colons become dashes (labels cannot hold `:`)."""
    text = str(net)
    if net.version == 6:
        text = text.replace(":", "-")
        if text.startswith("-"):
            text = "0" + text
        if "--" in text.split("/")[0][-2:]:
            text = text.replace("--/", "--0/")
    return text


def cidr_labels(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> LabelSet:
    """Labels of the CIDR identity for `net`: a `cidr:` label for it and for every shorter prefix
    containing it, plus the world label of its family."""
    out = [Label(SOURCE_CIDR, cidr_label_key(net.supernet(new_prefix=plen))) for plen in range(net.prefixlen)]
    out.append(Label(SOURCE_CIDR, cidr_label_key(net)))
    out.append(Label(SOURCE_RESERVED, "world"))
    return LabelSet(out)
