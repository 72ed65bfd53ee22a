"""HTTP policy as the proxy applies it: the agent's answer for one (source, destination, port), and
the verdict on one request with the semantics of Cilium's Envoy filter (cilium/proxy network_policy.cc).

The rules come from the agent's engine (`l7_policy` on the node-local API); the matchers are the
shared ones of `cilia.policy.l7`. What Envoy adds and the offline engine does not need is here:
`headerMatches` with a `mismatch` action edit the request (ADD, DELETE, REPLACE) or log it (LOG),
and as soon as one rule of a port has header matches every rule is evaluated, in order, on the
headers as the earlier actions left them. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cilia.errors import CiliaError
from cilia.policy.l7 import PARSER_HTTP, HeaderMatch, HTTPRequest, HTTPRule, http_rule_matches
from services.l7proxy.httpflows import compact


class PolicyAnswerError(CiliaError):
    """The agent's answer to `l7_policy` is not what the proxy can apply (it then denies)."""


@dataclass(frozen=True)
class Filter:
    """One allow covering the peer on this port: its rule name and HTTP rules (none: every request)."""

    reason: str
    rules: tuple[HTTPRule, ...] = ()


@dataclass(frozen=True)
class DirectionRules:
    """What one direction (the source's egress or the destination's ingress) says about the traffic."""

    direction: str
    endpoint: str
    reason: str
    deny: bool = False
    parser: str | None = PARSER_HTTP
    enforced: bool = True
    filters: tuple[Filter, ...] = ()


@dataclass(frozen=True)
class PortPolicy:
    """The agent's answer for (source IP, destination IP, port), valid while `revision` is current."""

    revision: int
    src_identity: int
    dst_identity: int
    ingress_applied: bool
    checks: tuple[DirectionRules, ...]
    source: Mapping[str, Any] = field(default_factory=dict)
    destination: Mapping[str, Any] = field(default_factory=dict)
    source_names: tuple[str, ...] = ()
    destination_names: tuple[str, ...] = ()

    @property
    def direction(self) -> str:
        """The flow direction: ingress when the destination's ingress rules were applied."""
        return "INGRESS" if self.ingress_applied else "EGRESS"


def http_rule_from_doc(doc: Mapping[str, Any]) -> HTTPRule:
    """An HTTP rule in CiliumNetworkPolicy's field names (as the agent sends it)."""
    matches = tuple(
        HeaderMatch(str(m["name"]), m.get("value"), m.get("mismatch")) for m in doc.get("headerMatches") or ()
    )
    return HTTPRule(
        method=doc.get("method") or None,
        path=doc.get("path") or None,
        host=doc.get("host") or None,
        headers=tuple(str(h) for h in doc.get("headers") or ()),
        header_matches=matches,
    )


def parse_answer(doc: Mapping[str, Any]) -> PortPolicy:
    """The agent's `l7_policy` answer; PolicyAnswerError if it is an error or malformed."""
    if not doc.get("ok"):
        raise PolicyAnswerError(str(doc.get("error") or "the agent refused the policy request"))
    try:
        checks = []
        for c in doc.get("checks") or ():
            filters = tuple(
                Filter(str(f.get("reason", "")), tuple(http_rule_from_doc(r) for r in f.get("rules") or ()))
                for f in c.get("filters") or ()
            )
            checks.append(
                DirectionRules(
                    direction=str(c["direction"]),
                    endpoint=str(c.get("endpoint", "")),
                    reason=str(c.get("reason", "")),
                    deny=bool(c.get("deny", False)),
                    parser=c.get("parser"),
                    enforced=bool(c.get("enforced", True)),
                    filters=filters,
                )
            )
        return PortPolicy(
            revision=int(doc["revision"]),
            src_identity=int(doc["src_identity"]),
            dst_identity=int(doc["dst_identity"]),
            ingress_applied=bool(doc.get("ingress_applied")),
            checks=tuple(checks),
            source=compact(dict(doc.get("source") or {})),
            destination=compact(dict(doc.get("destination") or {})),
            source_names=tuple(doc.get("source_names") or ()),
            destination_names=tuple(doc.get("destination_names") or ()),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise PolicyAnswerError(f"malformed l7_policy answer: {err!r}") from None


class Headers:
    """Request header fields in order, names case-insensitive; several fields of one name read as
    one value joined with `,` (Envoy's getAllOfHeaderAsString)."""

    def __init__(self, fields: Iterable[tuple[str, str]]) -> None:
        self.fields = list(fields)

    def get(self, name: str) -> str | None:
        lname = name.lower()
        values = [v for k, v in self.fields if k.lower() == lname]
        return ",".join(values) if values else None

    def add(self, name: str, value: str) -> None:
        self.fields.append((name, value))

    def remove(self, name: str) -> None:
        lname = name.lower()
        self.fields = [(k, v) for k, v in self.fields if k.lower() != lname]

    def set(self, name: str, value: str) -> None:
        self.remove(name)
        self.fields.append((name, value))

    def as_mapping(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, _ in self.fields:
            if k.lower() not in out:
                out[k.lower()] = self.get(k) or ""
        return out


@dataclass(frozen=True)
class HeaderEdit:
    """A change a mismatch action makes to the request: `add` a field, `remove` all, `set` one."""

    action: str
    name: str
    value: str = ""


@dataclass(frozen=True)
class Decision:
    """The proxy's verdict on one request, the edits to make before forwarding it, and what was
    logged (Envoy's missing / rejected headers)."""

    allowed: bool
    reason: str
    edits: tuple[HeaderEdit, ...] = ()
    missing: tuple[tuple[str, str], ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()


@dataclass
class _Work:
    method: str
    path: str
    host: str
    headers: Headers
    edits: list[HeaderEdit] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    _request: HTTPRequest | None = None

    def request(self) -> HTTPRequest:
        """The request as the matchers see it (rebuilt only after an edit)."""
        if self._request is None:
            self._request = HTTPRequest(self.method, self.path, self.host, self.headers.as_mapping())
        return self._request

    def edited(self, edit: HeaderEdit) -> None:
        self.edits.append(edit)
        self._request = None


def _header_match(hm: HeaderMatch, w: _Work) -> bool:
    """One header match (its match action is CONTINUE, as CiliumNetworkPolicy sets it): True if the
    rule may still match, after the mismatch action ran."""
    value = hm.value or ""
    have = w.headers.get(hm.name)
    presence = value == ""
    if (have is not None) if presence else (have == value):
        return True
    if hm.mismatch is None:  # FAIL_ON_MISMATCH
        w.missing.append((hm.name, value))
        return False
    if hm.mismatch == "LOG":
        w.missing.append((hm.name, value))
    elif hm.mismatch == "ADD":
        w.headers.add(hm.name, value)
        w.edited(HeaderEdit("add", hm.name, value))
        w.missing.append((hm.name, value))
    elif hm.mismatch == "DELETE":
        if presence or have is None:
            return True  # a failed presence match, or nothing to remove
        w.headers.remove(hm.name)
        w.edited(HeaderEdit("remove", hm.name))
        w.rejected.append((hm.name, have))
    elif hm.mismatch == "REPLACE":
        if have is not None:
            w.rejected.append((hm.name, have))
        w.headers.set(hm.name, value)
        w.edited(HeaderEdit("set", hm.name, value))
        w.missing.append((hm.name, value))
    else:  # an action Cilium does not know: fail closed
        w.missing.append((hm.name, value))
        return False
    return True


def _rule_allows(rule: HTTPRule, w: _Work, with_actions: bool) -> bool:
    """Envoy's HttpNetworkPolicyRule: method, path, host and headers first; then, when the port has
    header matches, every header match of the rule runs (even after one failed)."""
    basic = replace(rule, header_matches=()) if rule.header_matches else rule
    if not http_rule_matches(basic, w.request()):
        return False
    if not with_actions:
        return True
    accepted = True
    for hm in rule.header_matches:
        if not _header_match(hm, w):
            accepted = False
    return accepted


def _direction_allows(check: DirectionRules, w: _Work) -> tuple[bool, str]:
    """Envoy's PortNetworkPolicyRules: the allows covering the peer on the port are OR-ed; with no
    header match anywhere the first match decides, otherwise all run for their actions."""
    short_circuit = not any(r.header_matches for f in check.filters for r in f.rules)
    allowed_by: str | None = None
    for f in check.filters:
        if not f.rules:
            ok, why = True, f.reason
        else:
            ok, why = False, ""
            has_actions = any(r.header_matches for r in f.rules)
            for i, rule in enumerate(f.rules):
                if _rule_allows(rule, w, has_actions):
                    if not ok:
                        ok, why = True, f"{f.reason} http[{i}]"
                    if not has_actions:
                        break
        if ok:
            allowed_by = allowed_by or why
            if short_circuit:
                break
    if allowed_by is not None:
        return True, allowed_by
    names = ", ".join(f.reason for f in check.filters)
    return False, f"http: no rule matches ({names})"


def decide(
    policy: PortPolicy, method: str, path: str, host: str, headers: Sequence[tuple[str, str]]
) -> Decision:
    """The verdict on one request: every direction that redirected it must allow it (egress first,
    then ingress, on the headers as the egress actions left them)."""
    w = _Work(method, path, host, Headers(headers))
    reasons: list[str] = []
    for check in policy.checks:
        if check.deny:
            return Decision(False, f"denied at L3/L4: {check.reason}")
        if check.parser != PARSER_HTTP:
            continue  # not an HTTP redirect: this proxy does not inspect it
        if not check.enforced:
            reasons.append(check.reason)  # Cilium's ensureWildcard: no default deny, every request
            continue
        ok, why = _direction_allows(check, w)
        if not ok:
            return Decision(False, why, tuple(w.edits), tuple(w.missing), tuple(w.rejected))
        reasons.append(why)
    return Decision(
        True,
        "; ".join(reasons) or "no L7 rule applies",
        tuple(w.edits),
        tuple(w.missing),
        tuple(w.rejected),
    )
