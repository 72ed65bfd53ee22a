"""The policy engine of a node: every local endpoint's map state, kept current incrementally.

Endpoints with the same identity and the same named ports share one computation. A policy change
recomputes only the subjects its old or new rules select, plus, when it brings new CIDR prefixes
(new identities), the entries of just those identities for subjects whose selectors pick them up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cilia.policy.context import Peer, PolicyContext, PolicyOptions, endpoint_peer, host_peer, rule_selects
from cilia.policy.inventory import Inventory, Workload
from cilia.policy.ipcache import IPCache, policy_prefixes
from cilia.policy.mapstate import EndpointPolicy, MapStateDiff, compute_policy, diff, refresh_identities
from cilia.policy.repository import PolicyKey, Repository
from cilia.policy.rules import CompiledRule, IPAddress
from cilia.policy.selectorcache import Selectable, SelectorCache
from cilia.policy.translate import PolicyResource

SubjectKey = tuple[int, frozenset[tuple[str, tuple[int, int]]]]  # identity, ingress named ports
HOST_SUBJECT: SubjectKey = (1, frozenset())


@dataclass(frozen=True)
class EngineUpdate:
    """What one change did: map-state diffs per subject, and how many subjects were recomputed."""

    diffs: dict[SubjectKey, MapStateDiff]
    recomputed: int
    refreshed: int


class PolicyEngine:
    """Map states for the endpoints of an inventory under a policy repository."""

    def __init__(
        self,
        inventory: Inventory,
        options: PolicyOptions | None = None,
        repository: Repository | None = None,
        previous: IPCache | None = None,
    ) -> None:
        self.inventory = inventory
        self.options = options or PolicyOptions()
        self.repo = repository or Repository()
        fqdn = (
            {
                info.net.network_address: info.names
                for info in previous.identities.values()
                if info.names and info.net
            }
            if previous
            else None
        )
        self.ipcache = IPCache.build(inventory, self.repo.rules(), fqdn, previous=previous)
        self.cache = SelectorCache(self.ipcache.identities.values())
        self.policies: dict[SubjectKey, EndpointPolicy] = {}
        self._users: dict[Selectable, set[SubjectKey]] = {}
        self.subjects: dict[SubjectKey, Peer] = {}
        for w in inventory.workloads.values():
            self.subjects.setdefault(self.subject_key(w), endpoint_peer(inventory, w))
        if self.options.host_firewall is not False:
            self.subjects[HOST_SUBJECT] = host_peer(inventory)

    def subject_key(self, w: Workload) -> SubjectKey:
        return (self.inventory.identity_of(w), frozenset(w.named_ports.items()))

    def context(self) -> PolicyContext:
        return PolicyContext(self.repo.rules(), self.inventory, self.options)

    def compute_all(self) -> dict[SubjectKey, EndpointPolicy]:
        """Compute every subject's map state from scratch."""
        ctx = self.context()
        self._users.clear()
        for key, peer in self.subjects.items():
            self._compute(ctx, key, peer)
        return self.policies

    def policy_for(self, w: Workload) -> EndpointPolicy:
        key = self.subject_key(w)
        if key not in self.policies:
            self._compute(self.context(), key, self.subjects[key])
        return self.policies[key]

    def _compute(self, ctx: PolicyContext, key: SubjectKey, peer: Peer) -> EndpointPolicy:
        policy = compute_policy(ctx, self.cache, peer)
        self.policies[key] = policy
        for state in policy.directions.values():
            for g in state.grants:
                for sel in g.selectors:
                    self._users.setdefault(sel, set()).add(key)
        return policy

    def apply(self, objs: Iterable[PolicyResource]) -> EngineUpdate:
        """Apply policies (create or replace); returns the map-state diffs of the affected subjects."""
        objs = list(objs)
        keys = [self.repo_key(o) for o in objs]
        before = [r for k in keys for r in self.repo.compiled(k)]
        self.repo.apply(objs)
        after = [r for k in keys for r in self.repo.compiled(k)]
        return self._update(before + after, after)

    def delete(self, key: PolicyKey) -> EngineUpdate:
        before = list(self.repo.compiled(key))
        self.repo.delete(key)
        return self._update(before, [])

    def add_fqdn_ips(self, ips: dict[IPAddress, list[str]]) -> EngineUpdate:
        """The DNS proxy learned names for IPs: give them identities and update who selects them."""
        new_ids = [self.ipcache.add_fqdn_ip(ip, names) for ip, names in ips.items()]
        return self._update([], [], identities=new_ids)

    def remove_fqdn_ips(self, ips: dict[IPAddress, list[str] | None]) -> EngineUpdate:
        """Names expired (TTL) for IPs: close what only they opened."""
        changed: list[int] = []
        gone: list[int] = []
        for ip, names in ips.items():
            result = self.ipcache.remove_fqdn_ip(ip, names)
            if result is None:
                continue
            num, exists = result
            (changed if exists else gone).append(num)
        return self._update([], [], identities=changed, removed=gone)

    @staticmethod
    def repo_key(obj: PolicyResource) -> PolicyKey:
        from cilia.policy.repository import policy_key

        return policy_key(obj)

    def _update(
        self,
        changed: list[CompiledRule],
        added: list[CompiledRule],
        identities: Iterable[int] = (),
        removed: Iterable[int] = (),
    ) -> EngineUpdate:
        new_ids = list(identities) + self.ipcache.add_prefixes(policy_prefixes(added))
        changed_selectors = self.cache.add(self.ipcache.identities[i] for i in new_ids) if new_ids else set()
        gone = list(removed)
        if gone:
            changed_selectors |= self.cache.remove(gone)
            new_ids += gone
        ctx = self.context()
        diffs: dict[SubjectKey, MapStateDiff] = {}
        affected = {k for k, peer in self.subjects.items() if any(rule_selects(r, peer) for r in changed)}
        for key in affected:
            old = self.policies.get(key)
            old_entries = old.entries if old is not None else {}
            new = self._compute(ctx, key, self.subjects[key])
            d = diff(old_entries, new.entries)
            if d:
                diffs[key] = d
        refreshed = 0
        users = {k for sel in changed_selectors for k in self._users.get(sel, ())} - affected
        for key in users:
            policy = self.policies.get(key)
            if policy is None:
                continue
            old_entries = policy.entries
            for state in policy.directions.values():
                refresh_identities(state, self.cache, new_ids)
            refreshed += 1
            d = diff(old_entries, policy.entries)
            if d:
                diffs[key] = d
        return EngineUpdate(diffs, len(affected), refreshed)
