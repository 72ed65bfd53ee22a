"""Endpoint selectors: Kubernetes label selectors over Cilium labels, with label sources.

A selector key without a source (`org`) matches a label of any source (`any:org`), as Cilium's
`ParseSelectLabel` does; `k8s:org` matches only Kubernetes labels; `reserved:host` only reserved ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cilia.labels import SOURCE_ANY, LabelSet, split_source

Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]
OPERATORS: tuple[Operator, ...] = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True, order=True)
class Requirement:
    """One requirement of a selector: `source:key <op> values`."""

    source: str
    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: LabelSet) -> bool:
        present = labels.values_for(self.source, self.key)
        if self.operator == "In":
            return present is not None and any(v in self.values for v in present)
        if self.operator == "NotIn":
            return present is None or not any(v in self.values for v in present)
        if self.operator == "Exists":
            return present is not None
        return present is None

    @property
    def extended_key(self) -> str:
        return f"{self.source}:{self.key}"

    def __str__(self) -> str:
        if self.operator == "In" and len(self.values) == 1:
            return f"{self.extended_key}={self.values[0]}"
        if self.operator in ("Exists", "DoesNotExist"):
            return f"{self.extended_key} {self.operator}"
        return f"{self.extended_key} {self.operator} ({', '.join(self.values)})"


@dataclass(frozen=True)
class EndpointSelector:
    """A set of requirements, all of which must hold; no requirements selects every identity.

    `nothing` is the selector that selects no identity at all (entity `none`, empty peer lists).
    """

    requirements: tuple[Requirement, ...] = ()
    nothing: bool = False
    text: str = field(default="", compare=False)

    @classmethod
    def build(
        cls,
        match_labels: Mapping[str, str] | None = None,
        match_expressions: Iterable[tuple[str, str, Sequence[str]]] | None = None,
    ) -> EndpointSelector:
        """Build from matchLabels and (key, operator, values) expressions; keys default to `any:`."""
        reqs: list[Requirement] = []
        for key, value in (match_labels or {}).items():
            source, bare = split_source(key, SOURCE_ANY)
            reqs.append(Requirement(source, bare, "In", (value,)))
        for key, op, values in match_expressions or ():
            if op not in OPERATORS:
                raise ValueError(f"unknown operator {op!r}")
            source, bare = split_source(key, SOURCE_ANY)
            vals = tuple(sorted(set(values))) if op in ("In", "NotIn") else ()
            reqs.append(Requirement(source, bare, op, vals))
        return cls(tuple(sorted(set(reqs))))

    @classmethod
    def of_labels(cls, labels: Iterable[str]) -> EndpointSelector:
        """A selector requiring each `source:key=value` label (Cilium's `NewESFromLabels`)."""
        reqs = []
        for text in labels:
            source, rest = split_source(text, SOURCE_ANY)
            key, _, value = rest.partition("=")
            reqs.append(Requirement(source, key, "In", (value,)))
        return cls(tuple(sorted(set(reqs))))

    @property
    def is_wildcard(self) -> bool:
        return not self.nothing and not self.requirements

    def with_requirement(self, req: Requirement) -> EndpointSelector:
        if self.nothing:
            return self
        return EndpointSelector(tuple(sorted({*self.requirements, req})))

    def mentions_key(self, source: str, key: str) -> bool:
        """True when some requirement is on `key` with this source or with source `any`."""
        return any(r.key == key and r.source in (source, SOURCE_ANY) for r in self.requirements)

    def selects(self, labels: LabelSet) -> bool:
        if self.nothing:
            return False
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        if self.nothing:
            return "<none>"
        if not self.requirements:
            return "<all>"
        return ", ".join(str(r) for r in self.requirements)


WILDCARD = EndpointSelector()
NOTHING = EndpointSelector(nothing=True)
