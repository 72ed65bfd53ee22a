"""Layer 7 rules and their matchers: HTTP (as Cilium's Envoy filter judges) and DNS (as the DNS proxy).

HTTP: `method`, `path` and `host` are regular expressions that must match the whole value
(`path` is matched against the request target, query included, as Envoy's `:path`); every entry
of `headers` must be present (`Name` alone) or equal (`Name: value` / `Name value`);
`headerMatches` without a `mismatch` action must match, with one they never deny the request.
Within one rule all conditions must hold; the rules that apply to a peer on a port are OR-ed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from cilia.policy.fqdn import selector_matches, to_fqdn

PARSER_HTTP = "http"
PARSER_DNS = "dns"
# Cilium's listener priorities: when two redirects cover the same traffic, HTTP beats DNS.
PROXY_PRIORITY = {PARSER_HTTP: 27, PARSER_DNS: 7}


@dataclass(frozen=True)
class HeaderMatch:
    name: str
    value: str | None = None
    mismatch: str | None = None  # LOG, ADD, DELETE, REPLACE


@dataclass(frozen=True)
class HTTPRule:
    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: tuple[str, ...] = ()
    header_matches: tuple[HeaderMatch, ...] = ()

    def __str__(self) -> str:
        parts = [
            f"{k}={v}" for k, v in (("method", self.method), ("path", self.path), ("host", self.host)) if v
        ]
        parts += [f"header={h}" for h in self.headers]
        parts += [f"headerMatch={m.name}" for m in self.header_matches]
        return "{" + ", ".join(parts) + "}" if parts else "{}"


@dataclass(frozen=True)
class DNSRule:
    match_name: str | None = None
    match_pattern: str | None = None

    def matches(self, name: str) -> bool:
        return selector_matches(self.match_name, self.match_pattern, name)

    def __str__(self) -> str:
        return (
            f"matchName: {self.match_name}"
            if self.match_name is not None
            else f"matchPattern: {self.match_pattern}"
        )


L7Rule = HTTPRule | DNSRule


@dataclass(frozen=True)
class HTTPRequest:
    """An HTTP request as the proxy sees it; header names are matched case-insensitively."""

    method: str = "GET"
    path: str = "/"
    host: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for k, v in self.headers.items():
            if k.lower() == lname:
                return v
        return None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True)
class DNSQuery:
    name: str
    qtype: str = "A"

    @property
    def fqdn(self) -> str:
        return to_fqdn(self.name)

    def __str__(self) -> str:
        return f"DNS {self.qtype} {self.fqdn}"


L7Request = HTTPRequest | DNSQuery


@lru_cache(maxsize=8192)
def _full(regex: str) -> re.Pattern[str]:
    return re.compile(f"(?:{regex})\\Z")


def full_match(regex: str, value: str) -> bool:
    """Envoy's safe_regex semantics: the expression must match the entire value."""
    return _full(regex).match(value) is not None


def split_header(entry: str) -> tuple[str, str | None]:
    """`Name`, `Name: value` or `Name value` -> (name, value or None), as Cilium's Envoy config does."""
    name, sep, value = entry.partition(" ")
    name = name.rstrip(":")
    return (name, value.strip() if sep else None)


def http_rule_matches(rule: HTTPRule, req: HTTPRequest) -> bool:
    """True when every condition of `rule` holds for `req`."""
    if rule.method is not None and rule.method != "" and not full_match(rule.method, req.method):
        return False
    if rule.path is not None and rule.path != "" and not full_match(rule.path, req.path):
        return False
    if rule.host is not None and rule.host != "" and not full_match(rule.host, req.host):
        return False
    for entry in rule.headers:
        name, value = split_header(entry)
        have = req.header(name)
        if have is None or (value is not None and have != value):
            return False
    for hm in rule.header_matches:
        if hm.mismatch is not None:
            continue  # a mismatch action edits or logs the request, it never denies it
        have = req.header(hm.name)
        if have is None or (hm.value not in (None, "") and have != hm.value):
            return False
    return True


def dns_rule_matches(rule: DNSRule, query: DNSQuery) -> bool:
    return rule.matches(query.name)


def l7_rule_matches(rule: L7Rule, request: L7Request) -> bool:
    if isinstance(rule, HTTPRule):
        return isinstance(request, HTTPRequest) and http_rule_matches(rule, request)
    return isinstance(request, DNSQuery) and dns_rule_matches(rule, request)


def parser_of(rules: tuple[L7Rule, ...]) -> str | None:
    if not rules:
        return None
    return PARSER_HTTP if isinstance(rules[0], HTTPRule) else PARSER_DNS
