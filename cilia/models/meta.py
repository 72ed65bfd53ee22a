"""Kubernetes object metadata and label selectors, shared by every resource kind."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Label values as the Kubernetes API validates them (and Cilium's CRD for matchLabels).
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class Strict(BaseModel):
    """Base of every resource model: unknown fields are errors, as with a structural CRD schema."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def check_label_key(key: str) -> str:
    """Validate a selector or label key: optional `source:` (Cilium), optional DNS prefix, a name."""
    bare = key
    if ":" in bare:
        bare = bare.split(":", 1)[1]
    prefix, slash, name = bare.rpartition("/")
    if not slash:
        prefix, name = "", bare
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        raise ValueError(f"invalid label key {key!r}: name part must be 1-63 alphanumerics, '-', '_' or '.'")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        raise ValueError(f"invalid label key {key!r}: prefix must be a DNS subdomain")
    return key


def check_label_value(value: str) -> str:
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise ValueError(f"invalid label value {value!r}: at most 63 alphanumerics, '-', '_' or '.'")
    return value


class ObjectMeta(Strict):
    """`metadata`: name, namespace, labels and annotations; other Kubernetes fields are accepted."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str | None = None
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and (not v or len(v) > 253 or not _DNS_SUBDOMAIN.match(v)):
            raise ValueError("must be a lowercase DNS subdomain (a-z, 0-9, '-', '.')")
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        if v is not None and (not v or len(v) > 63 or not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", v)):
            raise ValueError("must be a DNS label (a-z, 0-9, '-')")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            check_label_key(key)
            check_label_value(value)
        return v


class LabelSelectorRequirement(Strict):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] | None = None

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        return check_label_key(v)

    @model_validator(mode="after")
    def _values(self) -> LabelSelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"values: must be non-empty when operator is {self.operator}")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"values: may not be specified when operator is {self.operator}")
        return self


class LabelSelector(Strict):
    """A Kubernetes label selector (`matchLabels`, `matchExpressions`)."""

    matchLabels: dict[str, str] | None = None
    matchExpressions: list[LabelSelectorRequirement] | None = None

    @field_validator("matchLabels", mode="before")
    @classmethod
    def _coerce(cls, v: Any) -> Any:
        # YAML turns `version: 1` or `enabled: true` into numbers and booleans; Kubernetes would
        # reject them, but the intent is unambiguous, so take their text.
        if isinstance(v, dict):
            return {k: _scalar_text(x) for k, x in v.items()}
        return v

    @field_validator("matchLabels")
    @classmethod
    def _labels(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for key, value in (v or {}).items():
            check_label_key(key)
            check_label_value(value)
        return v


def _scalar_text(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if value is None:
        return ""
    return value


def selector_matches(selector: LabelSelector | None, labels: dict[str, str], *, nil: bool = True) -> bool:
    """Kubernetes label-selector semantics on plain labels; `nil` is what an absent selector means
    (pools and L2 policies: everything; a BGP virtual router's serviceSelector: nothing)."""
    if selector is None:
        return nil
    for key, value in (selector.matchLabels or {}).items():
        if labels.get(key) != value:
            return False
    for req in selector.matchExpressions or []:
        present = req.key in labels
        if req.operator == "In" and (not present or labels[req.key] not in (req.values or [])):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in (req.values or []):
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True
