"""The policy repository: policies by (kind, namespace, name), kubectl-apply semantics, a revision.

Pure and in memory; the policy service persists it in the kvstore, `cilia policy matrix` builds
one per scenario step. Applying a batch is all or nothing: the batch is compiled before anything
changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cilia.models.loader import resource_key
from cilia.policy.rules import CompiledRule
from cilia.policy.translate import PolicyResource, compile_policy

PolicyKey = tuple[str, str, str]  # (kind, namespace, name); namespace "" when cluster-wide


@dataclass(frozen=True)
class Change:
    """What one apply or delete did, as kubectl reports it."""

    key: PolicyKey
    action: str  # created, configured, unchanged, deleted

    def __str__(self) -> str:
        kind, ns, name = self.key
        return f"{kind.lower()}/{name}{f' (namespace {ns})' if ns else ''} {self.action}"


def policy_key(obj: PolicyResource) -> PolicyKey:
    kind, ns, name = resource_key(obj)
    return (kind, ns, name)


class Repository:
    """Policies in the order they were first applied, each with its compiled rules."""

    def __init__(self) -> None:
        self._policies: dict[PolicyKey, PolicyResource] = {}
        self._compiled: dict[PolicyKey, tuple[CompiledRule, ...]] = {}
        self.revision = 0

    def copy(self) -> Repository:
        other = Repository()
        other._policies = dict(self._policies)
        other._compiled = dict(self._compiled)
        other.revision = self.revision
        return other

    def __len__(self) -> int:
        return len(self._policies)

    def __contains__(self, key: object) -> bool:
        return key in self._policies

    def keys(self) -> list[PolicyKey]:
        return list(self._policies)

    def get(self, key: PolicyKey) -> PolicyResource | None:
        return self._policies.get(key)

    def items(self) -> list[tuple[PolicyKey, PolicyResource]]:
        return list(self._policies.items())

    def compiled(self, key: PolicyKey) -> tuple[CompiledRule, ...]:
        return self._compiled.get(key, ())

    def rules(self) -> list[CompiledRule]:
        """Every compiled rule, policies in apply order, rules in document order."""
        return [rule for rules in self._compiled.values() for rule in rules]

    def apply(self, objs: Iterable[PolicyResource]) -> list[Change]:
        """Create or replace each policy; the revision grows once if anything changed."""
        staged: list[tuple[PolicyKey, PolicyResource, tuple[CompiledRule, ...]]] = []
        for obj in objs:
            staged.append((policy_key(obj), obj, tuple(compile_policy(obj))))
        changes: list[Change] = []
        for key, obj, compiled in staged:
            old = self._policies.get(key)
            if old is None:
                action = "created"
            elif old == obj:
                action = "unchanged"
            else:
                action = "configured"
            self._policies[key] = obj
            self._compiled[key] = compiled
            changes.append(Change(key, action))
        if any(c.action != "unchanged" for c in changes):
            self.revision += 1
        return changes

    def delete(self, key: PolicyKey) -> Change | None:
        if key not in self._policies:
            return None
        del self._policies[key]
        del self._compiled[key]
        self.revision += 1
        return Change(key, "deleted")
