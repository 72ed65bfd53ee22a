"""The identity-relevant label filter, shared by the policy engine and the identity service.

Cilium's defaults (`pkg/labelsfilter`): labels such as `pod-template-hash` or
`controller-revision-hash` never count, so they never split an identity and a policy can never
select on them. A pattern is a regular expression matched at the start of the label key; a
longer matching include beats a shorter matching exclude (`io.kubernetes.pod.namespace` is kept
although `io.kubernetes` is excluded).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from cilia.labels import SOURCE_ANY, SOURCE_RESERVED, Label, LabelSet


@dataclass(frozen=True)
class LabelPrefix:
    """One pattern: `[!][source:]regex`."""

    source: str
    regex: re.Pattern[str]
    ignore: bool

    @classmethod
    def parse(cls, text: str) -> LabelPrefix:
        ignore = False
        body = text
        source = SOURCE_ANY
        # Cilium writes the source before the `!`: `any:!io\.kubernetes`; accept both orders.
        if body.startswith("!"):
            ignore, body = True, body[1:]
        m = re.match(r"^([a-z0-9-]+):(.*)$", body)
        if m and not m.group(1).startswith("!"):
            source, body = m.group(1), m.group(2)
        if body.startswith("!"):
            ignore, body = True, body[1:]
        return cls(source, re.compile(body), ignore)

    def match_length(self, label: Label) -> int:
        """Length of the match at the start of the key, or 0 when the pattern does not apply."""
        if self.source != SOURCE_ANY and self.source != label.source:
            return 0
        m = self.regex.match(label.key)
        if m is None:
            return 0
        return max(m.end(), 1)


DEFAULT_PATTERNS: tuple[str, ...] = (
    f"{SOURCE_RESERVED}:.*",
    r"any:io\.kubernetes\.pod\.namespace",
    r"any:io\.cilium\.k8s\.namespace\.labels",
    r"any:app\.kubernetes\.io",
    r"any:!io\.kubernetes",
    r"any:!kubernetes\.io",
    r"any:!statefulset\.kubernetes\.io/pod-name",
    r"any:!apps\.kubernetes\.io/pod-index",
    r"any:!batch\.kubernetes\.io/job-completion-index",
    r"any:!batch\.kubernetes\.io/controller-uid",
    r"any:!.*beta\.kubernetes\.io",
    r"any:!k8s\.io",
    r"any:!pod-template-generation",
    r"any:!pod-template-hash",
    r"any:!controller-revision-hash",
    r"any:!annotation.*",
    r"any:!controller-uid",
    r"any:!etcd_node",
)


class LabelFilter:
    """Decides which labels are identity labels."""

    def __init__(self, patterns: Iterable[str] = DEFAULT_PATTERNS, whitelist: bool = False) -> None:
        self.prefixes = tuple(LabelPrefix.parse(p) for p in patterns)
        self.whitelist = whitelist

    def keeps(self, label: Label) -> bool:
        included = 0
        ignored = 0
        for p in self.prefixes:
            n = p.match_length(label)
            if not n:
                continue
            if p.ignore:
                ignored = n if ignored == 0 else min(ignored, n)
            else:
                included = max(included, n)
        return (not self.whitelist and ignored == 0) or included > ignored

    def filter(self, labels: Iterable[Label]) -> LabelSet:
        return LabelSet(label for label in labels if self.keeps(label))


DEFAULT_FILTER = LabelFilter()


def identity_labels(labels: Iterable[Label]) -> LabelSet:
    """The labels that count for security, under Cilium's default filter."""
    return DEFAULT_FILTER.filter(labels)
