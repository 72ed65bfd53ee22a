"""The selector cache: which identities each peer selector selects, kept current as identities come
and go (Cilium's `SelectorCache`). Selections are computed once per distinct selector, through a
label index, so thousands of rules over thousands of identities stay cheap.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from cilia.labels import SOURCE_ANY
from cilia.policy.ipcache import IdentityInfo
from cilia.policy.rules import CIDRSelector, FQDNSelector
from cilia.policy.selector import EndpointSelector

Selectable = EndpointSelector | CIDRSelector | FQDNSelector


def identity_selected(sel: Selectable, info: IdentityInfo) -> bool:
    """Does `sel` select this identity? CIDR and FQDN selectors only ever select outside identities."""
    if isinstance(sel, EndpointSelector):
        return sel.selects(info.labels)
    if not info.outside:
        return False
    if isinstance(sel, CIDRSelector):
        return sel.selects_world() if info.net is None else sel.selects_prefix(info.net)
    return any(sel.matches(n) for n in info.names)


class SelectorCache:
    """Selector -> the frozenset of identity numbers it selects."""

    def __init__(self, identities: Iterable[IdentityInfo] = ()) -> None:
        self.identities: dict[int, IdentityInfo] = {}
        self._by_ext: dict[tuple[str, str, str], set[int]] = {}  # (source, key, value) -> ids
        self._by_key: dict[tuple[str, str], set[int]] = {}  # (source, key) -> ids, and ("any", key)
        self._cache: dict[Selectable, frozenset[int]] = {}
        self._ranges: list[tuple[int, int, int, int]] | None = None  # (version, first, last, id), sorted
        self._named: set[int] = set()  # identities with DNS names (FQDN selectors look only at these)
        self.add(identities)

    def _index(self, info: IdentityInfo) -> None:
        self._ranges = None
        if info.names:
            self._named.add(info.id)
        for label in info.labels:
            self._by_ext.setdefault((label.source, label.key, label.value), set()).add(info.id)
            self._by_ext.setdefault((SOURCE_ANY, label.key, label.value), set()).add(info.id)
            self._by_key.setdefault((label.source, label.key), set()).add(info.id)
            self._by_key.setdefault((SOURCE_ANY, label.key), set()).add(info.id)

    def _unindex(self, info: IdentityInfo) -> None:
        self._ranges = None
        self._named.discard(info.id)
        for label in info.labels:
            for k in ((label.source, label.key, label.value), (SOURCE_ANY, label.key, label.value)):
                self._by_ext.get(k, set()).discard(info.id)
            for k2 in ((label.source, label.key), (SOURCE_ANY, label.key)):
                self._by_key.get(k2, set()).discard(info.id)

    def add(self, infos: Iterable[IdentityInfo]) -> set[Selectable]:
        """Add or replace identities; returns the cached selectors whose selection changed.

        Each cached selector is matched against the new identities only, through an index of
        just those (10,000 new CIDR identities must not mean 10,000 x every selector)."""
        changed: set[Selectable] = set()
        new = list(infos)
        for info in new:
            old = self.identities.get(info.id)
            if old is not None:
                self._unindex(old)
            self.identities[info.id] = info
            self._index(info)
        if not new or not self._cache:
            return changed
        fresh = SelectorCache(new)
        new_ids = {info.id for info in new}
        for sel, ids in list(self._cache.items()):
            updated = (ids - new_ids) | fresh._compute(sel)
            if updated != ids:
                self._cache[sel] = frozenset(updated)
                changed.add(sel)
        return changed

    def remove(self, ids: Iterable[int]) -> set[Selectable]:
        """Forget identities; returns the cached selectors that selected any of them."""
        gone = set(ids)
        for i in gone:
            info = self.identities.pop(i, None)
            if info is not None:
                self._unindex(info)
        changed: set[Selectable] = set()
        for sel, sel_ids in list(self._cache.items()):
            if sel_ids & gone:
                self._cache[sel] = sel_ids - gone
                changed.add(sel)
        return changed

    def select(self, sel: Selectable) -> frozenset[int]:
        cached = self._cache.get(sel)
        if cached is None:
            cached = self._cache[sel] = frozenset(self._compute(sel))
        return cached

    def _candidates(self, sel: EndpointSelector) -> Iterable[int]:
        best: set[int] | None = None
        for req in sel.requirements:
            if req.operator == "In":
                ids: set[int] = set()
                for v in req.values:
                    ids |= self._by_ext.get((req.source, req.key, v), set())
            elif req.operator == "Exists":
                ids = self._by_key.get((req.source, req.key), set())
            else:
                continue
            if best is None or len(ids) < len(best):
                best = ids
        return self.identities.keys() if best is None else best

    def _compute(self, sel: Selectable) -> set[int]:
        if isinstance(sel, EndpointSelector):
            if sel.nothing:
                return set()
            return {i for i in self._candidates(sel) if sel.selects(self.identities[i].labels)}
        if isinstance(sel, FQDNSelector):
            return {i for i in self._named if identity_selected(sel, self.identities[i])}
        out = {
            i
            for i, info in self.identities.items()
            if info.net is None and info.outside and sel.selects_world()
        }
        ranges = self._outside_ranges()
        first, last = int(sel.net.network_address), int(sel.net.broadcast_address)
        start = bisect.bisect_left(ranges, (sel.net.version, first, -1, -1))
        for version, lo, hi, ident in ranges[start:]:
            if version != sel.net.version or lo > last:
                break
            if hi <= last and identity_selected(sel, self.identities[ident]):
                out.add(ident)
        return out

    def _outside_ranges(self) -> list[tuple[int, int, int, int]]:
        if self._ranges is None:
            self._ranges = sorted(
                (info.net.version, int(info.net.network_address), int(info.net.broadcast_address), info.id)
                for info in self.identities.values()
                if info.net is not None
            )
        return self._ranges
