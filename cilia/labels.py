"""Labels as Cilium writes them (`source:key=value`), label sets, and label sources.

A label set is a frozenset of `Label`; `LabelSet.of(...)` builds one from Cilium's strings. The
filter that decides which labels count for security lives in `cilia.labelfilter`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

SOURCE_K8S = "k8s"
SOURCE_ANY = "any"
SOURCE_RESERVED = "reserved"
SOURCE_CIDR = "cidr"
SOURCE_FQDN = "fqdn"
SOURCE_UNSPEC = "unspec"
SOURCE_CONTAINER = "container"

# Kubernetes label keys that Cilium derives for every pod.
POD_NAMESPACE = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT = "io.cilium.k8s.policy.serviceaccount"
CLUSTER = "io.cilium.k8s.policy.cluster"
POLICY_NAME = "io.cilium.k8s.policy.name"
POLICY_NAMESPACE = "io.cilium.k8s.policy.namespace"
POLICY_DERIVED_FROM = "io.cilium.k8s.policy.derived-from"

DEFAULT_CLUSTER_NAME = "default"


@dataclass(frozen=True, order=True)
class Label:
    """One label: `source:key=value` (value may be empty, as in `reserved:host`)."""

    source: str
    key: str
    value: str = ""

    def __str__(self) -> str:
        if self.value:
            return f"{self.source}:{self.key}={self.value}"
        return f"{self.source}:{self.key}"

    @property
    def extended_key(self) -> str:
        """`source:key`, the form selectors use."""
        return f"{self.source}:{self.key}"

    @classmethod
    def parse(cls, text: str, default_source: str = SOURCE_UNSPEC) -> Label:
        """Parse Cilium's `source:key=value`; a missing source becomes `default_source`."""
        source, rest = split_source(text, default_source)
        key, sep, value = rest.partition("=")
        if not key:
            raise ValueError(f"invalid label {text!r}: empty key")
        return cls(source, key, value if sep else "")


def split_source(text: str, default_source: str) -> tuple[str, str]:
    """Split `source:rest` where the colon comes before any `=`; otherwise use the default source."""
    colon = text.find(":")
    equals = text.find("=")
    if colon > 0 and (equals < 0 or colon < equals):
        return text[:colon], text[colon + 1 :]
    if colon == 0:
        return default_source, text[1:]
    return default_source, text


class LabelSet(frozenset[Label]):
    """An immutable set of labels with fast lookups by `source:key` and by bare key."""

    @classmethod
    def of(cls, labels: Iterable[Label | str], default_source: str = SOURCE_UNSPEC) -> LabelSet:
        out: list[Label] = []
        for item in labels:
            out.append(item if isinstance(item, Label) else Label.parse(item, default_source))
        return cls(out)

    @classmethod
    def from_k8s(cls, labels: Mapping[str, str], source: str = SOURCE_K8S) -> LabelSet:
        return cls(Label(source, k, v) for k, v in labels.items())

    @cached_property
    def by_extended_key(self) -> dict[str, str]:
        return {label.extended_key: label.value for label in self}

    @cached_property
    def by_key(self) -> dict[str, frozenset[str]]:
        """Bare key -> values across sources, for selectors whose key has source `any`."""
        out: dict[str, set[str]] = {}
        for label in self:
            out.setdefault(label.key, set()).add(label.value)
        return {k: frozenset(v) for k, v in out.items()}

    def values_for(self, source: str, key: str) -> frozenset[str] | None:
        """The values a selector key `source:key` sees; None when the key is absent."""
        if source == SOURCE_ANY:
            return self.by_key.get(key)
        value = self.by_extended_key.get(f"{source}:{key}")
        return None if value is None else frozenset((value,))

    def has_source(self, source: str) -> bool:
        return any(label.source == source for label in self)

    def sorted_strings(self) -> list[str]:
        return sorted(str(label) for label in self)

    def __repr__(self) -> str:
        return f"LabelSet({self.sorted_strings()!r})"


def reserved(name: str) -> Label:
    return Label(SOURCE_RESERVED, name)
