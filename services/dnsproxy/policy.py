"""DNS verdicts, judged in the proxy from what the agent's `dns_policy` op returned.

The agent sends, for a (source endpoint, DNS server) pair, the source's egress L7 filters that
cover the server's identity; the proxy judges each query with the engine's own `l7_allowed`
(Cilium's `CheckAllowed`: the DNS rules of every allow covering the exact port are OR-ed). Having
the rules here, not a per-query call, keeps the agent off the packet path and lets the proxy go on
answering, with the last rules it was given, while the agent restarts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cilia.policy.fqdn import selector_matches
from cilia.policy.l4 import PortRange
from cilia.policy.l7 import PARSER_DNS, DNSQuery, DNSRule, HTTPRule, L7Rule
from cilia.policy.mapstate import L7Filter, l7_allowed
from cilia.policy.rules import EGRESS


@dataclass(frozen=True)
class Peer:
    """A flow's endpoint: an address with its identity, and the pod when it is one."""

    ip: str
    identity: int
    labels: tuple[str, ...] = ()
    namespace: str = ""
    pod_name: str = ""
    id: int = 0
    names: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.namespace}/{self.pod_name}" if self.pod_name else self.ip

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Peer:
        return cls(
            ip=str(doc.get("ip", "")),
            identity=int(doc.get("identity", 0)),
            labels=tuple(str(x) for x in doc.get("labels") or ()),
            namespace=str(doc.get("namespace", "")),
            pod_name=str(doc.get("pod_name", "")),
            id=int(doc.get("id", 0)),
            names=tuple(str(x) for x in doc.get("names") or ()),
        )


@dataclass(frozen=True)
class FQDNSelectors:
    """The node's `toFQDNs` selectors: only names some selector matches are reported to the agent."""

    selectors: tuple[tuple[str | None, str | None], ...] = ()
    _memo: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_json(cls, items: Sequence[Mapping[str, Any]]) -> FQDNSelectors:
        return cls(tuple((s.get("matchName"), s.get("matchPattern")) for s in items))

    def matching(self, name: str) -> tuple[str, ...]:
        """The selectors (as `matchName: x` / `matchPattern: y`) that match `name`."""
        hit = self._memo.get(name)
        if hit is None:
            hit = tuple(
                f"matchName: {n}" if n is not None else f"matchPattern: {p}"
                for n, p in self.selectors
                if selector_matches(n, p, name)
            )
            if len(self._memo) < 65536:
                self._memo[name] = hit
        return hit


@dataclass(frozen=True)
class DNSPolicy:
    """What decides the queries of one source endpoint to one DNS server."""

    ready: bool
    generation: int
    src: Peer | None
    dst: Peer
    enforced: bool
    filters: tuple[L7Filter, ...]
    selectors: FQDNSelectors
    _memo: dict[tuple[int, int, str], tuple[bool, str]] = field(
        default_factory=dict, compare=False, hash=False
    )

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> DNSPolicy:
        dst = Peer.from_json(doc["dst"])
        filters = []
        for f in doc.get("filters") or []:
            rules: list[L7Rule] = [
                DNSRule(r.get("matchName"), r.get("matchPattern")) for r in f.get("dns") or []
            ]
            if f.get("other_l7"):
                rules.append(HTTPRule())  # rules of another parser: the DNS proxy lets everything through
            filters.append(
                L7Filter(
                    EGRESS,
                    None,  # the agent sent only filters that cover this server's identity
                    PortRange(int(f["proto"]), int(f["lo"]), int(f["hi"])),
                    bool(f.get("exact")),
                    tuple(rules),
                    str(f.get("reason", "")),
                )
            )
        return cls(
            ready=bool(doc.get("ready")),
            generation=int(doc.get("generation", 0)),
            src=Peer.from_json(doc["src"]) if doc.get("src") else None,
            dst=dst,
            enforced=bool(doc.get("enforced")),
            filters=tuple(filters),
            selectors=FQDNSelectors.from_json(doc.get("fqdn_selectors") or []),
        )

    def judge(self, proto: int, port: int, qname: str) -> tuple[bool, str]:
        """(allowed, reason) for a query of `qname` sent to the server's `port`/`proto`."""
        key = (proto, port, qname)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        if self.src is None:
            verdict = (False, "the source is not an endpoint of this node")
        elif not self.enforced:
            verdict = (True, "egress not enforced")
        elif not any(f.covers(EGRESS, self.dst.identity, proto, port) and f.exact for f in self.filters):
            verdict = (False, "no DNS rule covers this server and port")
        else:
            verdict = l7_allowed(
                self.filters, EGRESS, self.dst.identity, proto, port, PARSER_DNS, DNSQuery(qname)
            )
        if len(self._memo) < 65536:
            self._memo[key] = verdict
        return verdict
