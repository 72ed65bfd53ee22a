"""`verdict()`: decide one connection by walking the rules directly, and say which rule decided.

This is the reference semantics (Cilium's, default enforcement mode unless told otherwise):
a deny that covers the packet wins; a direction no rule enforces is allowed; an enforced direction
allows what some rule allows; the local host may reach local endpoints (allow-localhost); L7
rules of every rule that allows the peer on a port are OR-ed, and a rule without L7 rules lets
every request through. It deliberately does not use the map-state code, so that comparing the two
(tests/unit/test_mapstate_equivalence.py) proves something.
"""

from __future__ import annotations

from dataclasses import dataclass

from cilia.identity import HOST
from cilia.policy.context import Peer, PolicyContext, peer_selected
from cilia.policy.l4 import ALL_PORTS, proto_number
from cilia.policy.l7 import (
    PARSER_DNS,
    PARSER_HTTP,
    PROXY_PRIORITY,
    DNSQuery,
    HTTPRequest,
    L7Request,
    L7Rule,
    l7_rule_matches,
    parser_of,
)
from cilia.policy.rules import EGRESS, INGRESS, Direction, RuleEntry

ALLOW_LOCALHOST = "allow-localhost (the local host may always reach local endpoints)"


@dataclass(frozen=True)
class Contribution:
    """An allow (or deny) that covers the packet: which rule, and the L7 rules of its port."""

    entry: RuleEntry | None
    reason: str
    l7: tuple[L7Rule, ...] = ()
    exact: bool = False  # the rule names exactly this port (its own L4 filter, where DNS rules live)

    @property
    def parser(self) -> str | None:
        return parser_of(self.l7)


@dataclass(frozen=True)
class DirectionVerdict:
    """The verdict of one side: the source's egress or the destination's ingress."""

    direction: Direction
    subject: str
    allowed: bool
    reason: str
    enforced: bool
    explicit: bool  # decided by a rule (allow, deny, L7, allow-localhost), not by a default
    redirect: str | None = None  # proxy the traffic goes through: "http" or "dns"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str
    egress: DirectionVerdict | None = None
    ingress: DirectionVerdict | None = None

    @property
    def redirect(self) -> str | None:
        for d in (self.egress, self.ingress):
            if d is not None and d.redirect:
                return d.redirect
        return None


def entry_covers(
    ctx: PolicyContext, entry: RuleEntry, subject: Peer, peer: Peer, proto: int, port: int
) -> list[Contribution]:
    """The ways `entry` covers a packet from/to `peer` (empty if it does not)."""
    if not entry.wildcard and not any(peer_selected(s, peer) for ps in entry.peers for s in ctx.resolve(ps)):
        return []
    if entry.ports is None:
        return [Contribution(entry, entry.reason)]
    resolve = ctx.named_port_resolver(entry.direction, subject)
    out: list[Contribution] = []
    for pr in entry.ports:
        for spec in pr.ports:
            if any(r.covers(proto, port) for r in spec.ranges(resolve)):
                out.append(Contribution(entry, entry.reason, pr.l7, exact=spec.exact))
    return out


def direction_verdict(
    ctx: PolicyContext,
    subject: Peer,
    peer: Peer,
    direction: Direction,
    proto: int,
    port: int,
    l7: L7Request | None = None,
) -> DirectionVerdict:
    """Judge one direction for `subject` (whose policy applies) talking with `peer`."""
    mode = ctx.options.enforcement
    if mode == "never":
        return DirectionVerdict(
            direction, subject.name, True, "default-allow (policy enforcement is never)", False, False
        )
    rules = ctx.subject_rules(subject)
    for rule in rules:
        for entry in rule.entries:
            if (
                entry.direction == direction
                and entry.deny
                and entry_covers(ctx, entry, subject, peer, proto, port)
            ):
                return DirectionVerdict(direction, subject.name, False, f"deny: {entry.reason}", True, True)
    allows: list[Contribution] = []
    for rule in rules:
        for entry in rule.entries:
            if entry.direction == direction and not entry.deny:
                allows += entry_covers(ctx, entry, subject, peer, proto, port)
    if (
        direction == INGRESS
        and ctx.options.allow_localhost
        and peer.identity == HOST
        and peer.kind == "host"
        and subject.kind == "endpoint"
    ):
        allows.append(Contribution(None, ALLOW_LOCALHOST))
    enforcing = [r for r in rules if direction in r.enforces]
    if mode != "always" and not enforcing:
        if any(direction in r.has for r in rules):
            refs = ", ".join(sorted({str(r.ref) for r in rules if direction in r.has}))
            why = (
                f"default-allow ({refs} select {subject.name} for {direction} with enableDefaultDeny: false)"
            )
        else:
            why = f"default-allow (no policy selects {subject.name} for {direction})"
        # Rules that do not enforce still redirect their L7 ports (for visibility), allowing every request.
        redirect = _redirect_parser(allows)
        return DirectionVerdict(direction, subject.name, True, why, False, False, redirect)
    if not allows:
        if enforcing:
            why = f"default-deny (endpoint selected by {enforcing[0].ref} for {direction})"
        else:
            why = f"default-deny (policy enforcement is always, nothing allows {direction})"
        return DirectionVerdict(direction, subject.name, False, why, True, False)
    return _l7_verdict(direction, subject, allows, l7)


def _redirect_parser(allows: list[Contribution]) -> str | None:
    parsers = {c.parser for c in allows if c.parser is not None}
    return max(parsers, key=lambda p: PROXY_PRIORITY[p]) if parsers else None


def _l7_verdict(
    direction: Direction, subject: Peer, allows: list[Contribution], l7: L7Request | None
) -> DirectionVerdict:
    first = allows[0]
    parser = _redirect_parser(allows)
    if parser is None:
        return DirectionVerdict(direction, subject.name, True, first.reason, True, True)
    if parser == PARSER_HTTP and isinstance(l7, HTTPRequest):
        for c in allows:
            if not c.l7 or c.parser != PARSER_HTTP:
                return DirectionVerdict(direction, subject.name, True, c.reason, True, True, parser)
            for i, rule in enumerate(c.l7):
                if l7_rule_matches(rule, l7):
                    return DirectionVerdict(
                        direction, subject.name, True, f"{c.reason} http[{i}]", True, True, parser
                    )
        refs = _refs(c for c in allows if c.parser == PARSER_HTTP)
        why = f"l7-deny: {l7.method} {l7.path} matches no HTTP rule of {refs}"
        return DirectionVerdict(direction, subject.name, False, why, True, True, parser)
    if parser == PARSER_DNS and isinstance(l7, DNSQuery):
        for c in allows:
            if not c.exact:
                continue  # the DNS proxy only knows the rules of the port it serves
            if not c.l7 or c.parser != PARSER_DNS:
                return DirectionVerdict(direction, subject.name, True, c.reason, True, True, parser)
            for i, rule in enumerate(c.l7):
                if l7_rule_matches(rule, l7):
                    return DirectionVerdict(
                        direction, subject.name, True, f"{c.reason} dns[{i}]", True, True, parser
                    )
        refs = _refs(c for c in allows if c.parser == PARSER_DNS)
        why = f"dns-deny: query {l7.fqdn} matches no DNS rule of {refs}"
        return DirectionVerdict(direction, subject.name, False, why, True, True, parser)
    return DirectionVerdict(direction, subject.name, True, first.reason, True, True, parser)


def _refs(contributions: object) -> str:
    seen: list[str] = []
    for c in contributions:  # type: ignore[attr-defined]
        if c.reason not in seen:
            seen.append(c.reason)
    return ", ".join(seen)


def verdict(
    ctx: PolicyContext,
    src: Peer,
    dst: Peer,
    port: int,
    protocol: str | int,
    l7: L7Request | None = None,
) -> Verdict:
    """Is a connection from `src` to `dst` on `port`/`protocol` allowed, and which rule decided?

    The source's egress policy is judged first, then the destination's ingress policy. For ICMP,
    `port` is the ICMP type.
    """
    proto = protocol if isinstance(protocol, int) else proto_number(protocol)
    egress = direction_verdict(ctx, src, dst, EGRESS, proto, port, l7) if ctx.is_subject(src) else None
    ingress = direction_verdict(ctx, dst, src, INGRESS, proto, port, l7) if ctx.is_subject(dst) else None
    for side in (egress, ingress):
        if side is not None and not side.allowed:
            return Verdict(False, side.reason, egress, ingress)
    return Verdict(True, _allowed_reason(src, dst, egress, ingress), egress, ingress)


def _allowed_reason(
    src: Peer, dst: Peer, egress: DirectionVerdict | None, ingress: DirectionVerdict | None
) -> str:
    sides = [s for s in (egress, ingress) if s is not None]
    explicit = [s.reason for s in sides if s.explicit]
    if explicit:
        return ", ".join(explicit)
    defaults = [s for s in sides if not s.enforced]
    if len(defaults) == 2:
        return f"default-allow (no policy selects {src.name} for egress or {dst.name} for ingress)"
    if defaults:
        return defaults[0].reason
    return "default-allow (nothing applies)"


def dns_resolves(ctx: PolicyContext, src: Peer, name: str) -> bool:
    """Would the DNS proxy answer `src`'s query for `name`, so that `toFQDNs` learns the answer?

    Only if some DNS server the source may reach, on a port its egress redirects to the DNS
    proxy, accepts the query: the DNS rules of that port let the name through, and no deny or
    ingress policy of the server stops it.
    """
    query = DNSQuery(name)
    candidates: list[Peer] | None = None
    for rule in ctx.subject_rules(src):
        for entry in rule.entries:
            if entry.direction != EGRESS or entry.deny or entry.ports is None:
                continue
            resolve = ctx.named_port_resolver(EGRESS, src)
            for pr in entry.ports:
                if pr.parser != PARSER_DNS:
                    continue
                if candidates is None:
                    candidates = _dns_server_candidates(ctx)
                for spec in pr.ports:
                    for rng in spec.ranges(resolve):
                        for server in candidates:
                            v = verdict(ctx, src, server, rng.lo, rng.proto, query)
                            if v.allowed and v.egress is not None and v.egress.redirect == PARSER_DNS:
                                return True
    return False


def _dns_server_candidates(ctx: PolicyContext) -> list[Peer]:
    """Every party that could be a DNS server: the pods, the nodes, and outside addresses the rules name."""
    import ipaddress

    from cilia.policy.context import endpoint_peer, host_peer, remote_node_peer, world_peer
    from cilia.policy.rules import CIDRSelector

    inv = ctx.inventory
    out = [endpoint_peer(inv, w) for w in inv.workloads.values()]
    out += [host_peer(inv), remote_node_peer(inv), world_peer()]
    for rule in ctx.rules:
        for entry in rule.entries:
            for peer in entry.peers:
                if isinstance(peer, CIDRSelector):
                    for addr in (peer.net.network_address, peer.net.broadcast_address):
                        if peer.selects_ip(addr):
                            out.append(world_peer(ipaddress.ip_address(addr)))
                            break
    return out


__all__ = [
    "ALL_PORTS",
    "Contribution",
    "DirectionVerdict",
    "Verdict",
    "direction_verdict",
    "dns_resolves",
    "verdict",
]
