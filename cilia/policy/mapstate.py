"""The map state: the policy-map entries the datapath holds for one endpoint, and their lookup.

Keys are (direction, remote identity or 0 for any, protocol or 0 for any, port prefix) as in
Cilium's `bpf/lib/policy.h`: protocol and port form a longest-prefix key (`plen` 0 = any protocol,
8 = the protocol, 8+k = the protocol and k leading port bits; port ranges become several aligned
prefixes). Lookup (`lookup`) is the datapath's: the longest match for the remote identity and the
longest match for identity 0; a deny wins, then the higher proxy priority, then the longer
prefix, then the identity-specific entry.

Entries for identity X are computed from the grants that select X specifically, entries for
identity 0 from the wildcard grants; the datapath's precedence combines them. For each identity
the entries are exact: the longest match at every (protocol, port) gives the strongest grant
covering it (deny > redirect > allow).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from cilia.identity import ANY, HOST
from cilia.policy.context import Peer, PolicyContext
from cilia.policy.l4 import ALL_PORTS, MAX_PORT, PROTO_ANY, PortRange, range_prefixes
from cilia.policy.l7 import (
    PARSER_DNS,
    PARSER_HTTP,
    PROXY_PRIORITY,
    L7Request,
    L7Rule,
    l7_rule_matches,
    parser_of,
)
from cilia.policy.rules import DIRECTIONS, INGRESS, CompiledRule, Direction, RuleEntry
from cilia.policy.selectorcache import Selectable, SelectorCache

ALLOW_LOCALHOST = "allow-localhost (the local host may always reach local endpoints)"
PLEN_PROTO = 8
PLEN_FULL = 24


class MapKey(NamedTuple):
    direction: Direction
    identity: int
    proto: int
    port: int
    plen: int  # 0: any protocol; 8: protocol; 9..24: protocol and port prefix

    def __str__(self) -> str:
        from cilia.policy.l4 import proto_name

        if self.plen == 0:
            l4 = "ANY"
        elif self.plen == PLEN_PROTO:
            l4 = proto_name(self.proto)
        elif self.plen == PLEN_FULL:
            l4 = f"{self.port}/{proto_name(self.proto)}"
        else:
            size = 1 << (PLEN_FULL - self.plen)
            l4 = f"{self.port}-{self.port + size - 1}/{proto_name(self.proto)}"
        return f"{self.direction} {self.identity or 'ANY'} {l4}"


@dataclass(frozen=True)
class MapEntry:
    """allow, deny, or allow through a proxy (`parser` http or dns); `reason` names the rule."""

    deny: bool
    parser: str | None = None
    reason: str = ""

    @property
    def priority(self) -> int:
        """Cilium's proxy_port_priority: 0 without a redirect, listener-derived with one."""
        return 0 if self.deny or self.parser is None else PROXY_PRIORITY[self.parser]

    @property
    def verdict(self) -> str:
        if self.deny:
            return "deny"
        return f"redirect:{self.parser}" if self.parser else "allow"

    def same_kind(self, other: MapEntry | None) -> bool:
        return other is not None and other.deny == self.deny and other.parser == self.parser

    def stronger_than(self, other: MapEntry | None) -> bool:
        if other is None:
            return True
        return (self.deny, self.priority) > (other.deny, other.priority)


@dataclass(frozen=True)
class L7Filter:
    """An allow as the proxies see it: who (None = anyone), which ports, which L7 rules (none = all)."""

    direction: Direction
    identities: frozenset[int] | None
    range: PortRange
    exact: bool
    rules: tuple[L7Rule, ...]
    reason: str

    def covers(self, direction: Direction, identity: int, proto: int, port: int) -> bool:
        return (
            direction == self.direction
            and (self.identities is None or identity in self.identities)
            and self.range.covers(proto, port)
        )


@dataclass
class Grant:
    """One rule's contribution to the map state: identities (None = any) x one port range."""

    selectors: tuple[Selectable, ...]  # empty with wildcard
    wildcard: bool
    ids: frozenset[int]
    range: PortRange
    entry: MapEntry
    l7: tuple[L7Rule, ...] = ()
    exact: bool = False


@dataclass
class DirectionState:
    """The grants and entries of one direction of one subject."""

    direction: Direction
    enforced: bool
    grants: list[Grant] = field(default_factory=list)
    entries: dict[MapKey, MapEntry] = field(default_factory=dict)
    keys_by_identity: dict[int, set[MapKey]] = field(default_factory=dict)

    @property
    def has_redirect(self) -> bool:
        return any(g.entry.parser for g in self.grants if not g.entry.deny)


@dataclass
class EndpointPolicy:
    """The map state of one subject (an identity, with its own named ports): both directions."""

    subject: str
    identity: int
    directions: dict[Direction, DirectionState]

    @property
    def entries(self) -> dict[MapKey, MapEntry]:
        out: dict[MapKey, MapEntry] = {}
        for d in self.directions.values():
            out.update(d.entries)
        return out

    def enforced(self, direction: Direction) -> bool:
        return self.directions[direction].enforced

    def lookup(self, direction: Direction, identity: int, proto: int, port: int) -> MapEntry | None:
        return lookup(self.directions[direction].entries, direction, identity, proto, port)

    def l7_filters(self, direction: Direction) -> list[L7Filter]:
        state = self.directions[direction]
        if not state.has_redirect:
            return []
        return [
            L7Filter(direction, None if g.wildcard else g.ids, g.range, g.exact, g.l7, g.entry.reason)
            for g in state.grants
            if not g.entry.deny
        ]

    def decide(
        self, direction: Direction, identity: int, proto: int, port: int, request: L7Request | None = None
    ) -> tuple[bool, str, str | None]:
        """(allowed, reason, proxy) for a packet, and for its L7 request when the proxy would judge it."""
        entry = self.lookup(direction, identity, proto, port)
        if entry is None:
            return (False, "no map-state entry", None)
        if entry.deny:
            return (False, entry.reason, None)
        if entry.parser is None or request is None:
            return (True, entry.reason, entry.parser)
        if not self.directions[direction].enforced:
            # No default-deny for this endpoint: Cilium adds an L7 wildcard to every filter (ensureWildcard).
            return (True, entry.reason, entry.parser)
        return (
            *l7_allowed(self.l7_filters(direction), direction, identity, proto, port, entry.parser, request),
            entry.parser,
        )


def l7_allowed(
    filters: Sequence[L7Filter],
    direction: Direction,
    identity: int,
    proto: int,
    port: int,
    parser: str,
    request: L7Request,
) -> tuple[bool, str]:
    """What a proxy decides: the rules of every allow covering the peer on this port are OR-ed.

    The HTTP proxy also sees allows of every port (an L3-only rule lets every request through);
    the DNS proxy only the allows of the exact port it serves.
    """
    from cilia.policy.l7 import DNSQuery, HTTPRequest

    if (parser == PARSER_HTTP and not isinstance(request, HTTPRequest)) or (
        parser == PARSER_DNS and not isinstance(request, DNSQuery)
    ):
        return (True, "not inspected")
    reasons = []
    for f in filters:
        if not f.covers(direction, identity, proto, port) or (parser == PARSER_DNS and not f.exact):
            continue
        if not f.rules or parser_of(f.rules) != parser:
            return (True, f.reason)
        for i, rule in enumerate(f.rules):
            if l7_rule_matches(rule, request):
                return (True, f"{f.reason} {parser}[{i}]")
        reasons.append(f.reason)
    return (False, f"{parser}: no rule matches ({', '.join(reasons)})")


# --- lookup ------------------------------------------------------------------------------------


def _lpm(
    entries: dict[MapKey, MapEntry], direction: Direction, identity: int, proto: int, port: int
) -> tuple[MapEntry, int] | None:
    for plen in range(PLEN_FULL, PLEN_PROTO, -1):
        shift = PLEN_FULL - plen
        e = entries.get(MapKey(direction, identity, proto, (port >> shift) << shift, plen))
        if e is not None:
            return (e, plen)
    e = entries.get(MapKey(direction, identity, proto, 0, PLEN_PROTO))
    if e is not None:
        return (e, PLEN_PROTO)
    e = entries.get(MapKey(direction, identity, PROTO_ANY, 0, 0))
    return (e, 0) if e is not None else None


def lookup(
    entries: dict[MapKey, MapEntry], direction: Direction, identity: int, proto: int, port: int
) -> MapEntry | None:
    """The datapath's policy lookup (bpf/lib/policy.h), over a map state."""
    l3 = _lpm(entries, direction, identity, proto, port) if identity != ANY else None
    if l3 is not None and l3[0].deny:
        return l3[0]
    l4 = _lpm(entries, direction, ANY, proto, port)
    if l4 is not None and (
        l4[0].deny
        or l3 is None
        or l4[0].priority > l3[0].priority
        or (l4[0].priority == l3[0].priority and l4[1] > l3[1])
    ):
        return l4[0]
    return l3[0] if l3 is not None else None


# --- computation -------------------------------------------------------------------------------


def lpm_entries(grants: Iterable[Grant]) -> dict[tuple[int, int, int], MapEntry]:
    """Exact LPM entries for one identity: at every (proto, port) the longest match is the strongest grant."""
    base: MapEntry | None = None
    per_proto: dict[int, list[tuple[int, int, MapEntry]]] = {}
    for g in grants:
        if g.range.proto == PROTO_ANY:
            if g.entry.stronger_than(base):
                base = g.entry
        else:
            per_proto.setdefault(g.range.proto, []).append((g.range.lo, g.range.hi, g.entry))
    out: dict[tuple[int, int, int], MapEntry] = {}
    if base is not None:
        out[(PROTO_ANY, 0, 0)] = base
    for proto, items in per_proto.items():
        segments = _segments(items, base)
        if len(segments) == 1:
            value = segments[0][2]
            if value is not None and not value.same_kind(base):
                out[(proto, 0, PLEN_PROTO)] = value
            continue
        for lo, hi, value in segments:
            if value is None or value.same_kind(base):
                continue
            for port, bits in range_prefixes(lo, hi):
                out[(proto, port, PLEN_PROTO + bits)] = value
    return out


def _segments(
    items: list[tuple[int, int, MapEntry]], base: MapEntry | None
) -> list[tuple[int, int, MapEntry | None]]:
    """Split [0, 65535] where coverage changes; each segment gets its strongest entry (or base)."""
    bounds = {0, MAX_PORT + 1}
    for lo, hi, _ in items:
        bounds.add(lo)
        bounds.add(hi + 1)
    points = sorted(bounds)
    starts = sorted(items, key=lambda t: t[0])
    active: list[tuple[int, int, MapEntry]] = []
    out: list[tuple[int, int, MapEntry | None]] = []
    idx = 0
    for a, b in itertools.pairwise(points):
        while idx < len(starts) and starts[idx][0] <= a:
            active.append(starts[idx])
            idx += 1
        active = [t for t in active if t[1] >= a]
        best = base
        for _, _, e in active:
            if e.stronger_than(best):
                best = e
        if out and out[-1][2] == best:
            out[-1] = (out[-1][0], b - 1, best)
        else:
            out.append((a, b - 1, best))
    return out


def _grants_for_entry(
    ctx: PolicyContext, cache: SelectorCache, entry: RuleEntry, subject: Peer
) -> Iterator[Grant]:
    if entry.wildcard:
        selectors: tuple[Selectable, ...] = ()
        ids: frozenset[int] = frozenset()
    else:
        selectors = tuple(s for ps in entry.peers for s in ctx.resolve(ps))
        ids = frozenset().union(*(cache.select(s) for s in selectors)) if selectors else frozenset()
        if not ids:
            # Keep the grant (an identity may appear later) but it covers nobody yet.
            pass
    reason = f"deny: {entry.reason}" if entry.deny else entry.reason
    if entry.ports is None:
        yield Grant(selectors, entry.wildcard, ids, ALL_PORTS, MapEntry(entry.deny, None, reason))
        return
    resolve = ctx.named_port_resolver(entry.direction, subject)
    for pr in entry.ports:
        parser = None if entry.deny else pr.parser
        for spec in pr.ports:
            for rng in spec.ranges(resolve):
                yield Grant(
                    selectors,
                    entry.wildcard,
                    ids,
                    rng,
                    MapEntry(entry.deny, parser, reason),
                    pr.l7,
                    spec.exact,
                )


def compute_direction(
    ctx: PolicyContext,
    cache: SelectorCache,
    subject: Peer,
    rules: Sequence[CompiledRule],
    direction: Direction,
) -> DirectionState:
    """Grants and exact entries of one direction for one subject."""
    mode = ctx.options.enforcement
    grants: list[Grant] = []
    if mode == "never":
        state = DirectionState(direction, False)
        state.grants.append(
            Grant(
                (),
                True,
                frozenset(),
                ALL_PORTS,
                MapEntry(False, None, "default-allow (policy enforcement is never)"),
            )
        )
        _fill(state)
        return state
    for rule in rules:
        for entry in rule.entries:
            if entry.direction == direction:
                grants.extend(_grants_for_entry(ctx, cache, entry, subject))
    if direction == INGRESS and ctx.options.allow_localhost and subject.kind == "endpoint":
        grants.append(Grant((), False, frozenset({HOST}), ALL_PORTS, MapEntry(False, None, ALLOW_LOCALHOST)))
    enforced = mode == "always" or any(direction in r.enforces for r in rules)
    if not enforced:
        grants.append(
            Grant(
                (),
                True,
                frozenset(),
                ALL_PORTS,
                MapEntry(False, None, f"default-allow ({direction} not enforced)"),
            )
        )
    state = DirectionState(direction, enforced, grants)
    _fill(state)
    return state


def _fill(state: DirectionState) -> None:
    """(Re)compute every entry of a direction from its grants."""
    state.entries.clear()
    state.keys_by_identity.clear()
    wildcard = [g for g in state.grants if g.wildcard]
    by_identity: dict[int, list[int]] = {}
    for i, g in enumerate(state.grants):
        if not g.wildcard:
            for ident in g.ids:
                by_identity.setdefault(ident, []).append(i)
    _put(state, ANY, lpm_entries(wildcard))
    memo: dict[tuple[int, ...], dict[tuple[int, int, int], MapEntry]] = {}
    for ident, idxs in by_identity.items():
        sig = tuple(idxs)
        computed = memo.get(sig)
        if computed is None:
            computed = memo[sig] = lpm_entries(state.grants[i] for i in idxs)
        _put(state, ident, computed)


def _put(state: DirectionState, identity: int, computed: dict[tuple[int, int, int], MapEntry]) -> None:
    keys = set()
    for (proto, port, plen), value in computed.items():
        key = MapKey(state.direction, identity, proto, port, plen)
        state.entries[key] = value
        keys.add(key)
    if keys:
        state.keys_by_identity[identity] = keys


def refresh_identities(state: DirectionState, cache: SelectorCache, identities: Iterable[int]) -> None:
    """Re-read selections and recompute only the entries of these identities (an identity came or went)."""
    todo = set(identities)
    for g in state.grants:
        if not g.wildcard and g.selectors:
            g.ids = frozenset().union(*(cache.select(s) for s in g.selectors))
    for ident in todo:
        for key in state.keys_by_identity.pop(ident, set()):
            state.entries.pop(key, None)
        _put(state, ident, lpm_entries(g for g in state.grants if not g.wildcard and ident in g.ids))


def compute_policy(ctx: PolicyContext, cache: SelectorCache, subject: Peer) -> EndpointPolicy:
    """The map state of `subject` for both directions."""
    rules = ctx.subject_rules(subject)
    dirs = {d: compute_direction(ctx, cache, subject, rules, d) for d in DIRECTIONS}
    return EndpointPolicy(subject.name, subject.identity, dirs)


@dataclass(frozen=True)
class MapStateDiff:
    """What changes in the datapath's policy map: entries to write, keys to delete."""

    upserts: dict[MapKey, MapEntry]
    deletes: frozenset[MapKey]

    def __bool__(self) -> bool:
        return bool(self.upserts or self.deletes)

    def __len__(self) -> int:
        return len(self.upserts) + len(self.deletes)


def diff(old: dict[MapKey, MapEntry], new: dict[MapKey, MapEntry]) -> MapStateDiff:
    upserts = {k: v for k, v in new.items() if old.get(k) != v}
    deletes = frozenset(k for k in old if k not in new)
    return MapStateDiff(upserts, deletes)
