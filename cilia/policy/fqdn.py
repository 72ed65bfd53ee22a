"""DNS names and `matchName`/`matchPattern`, as Cilium's `pkg/fqdn/matchpattern` reads them.

Names are compared lower-cased and fully qualified (`api.github.com.`). In a pattern `*` matches
any run of DNS characters but never a dot, `**.` at the front matches one or more labels, neither
matches the apex, and `*` alone matches every name.
"""

from __future__ import annotations

import re
from functools import lru_cache

_DNS_CHARS = "[-a-z0-9_]"


def to_fqdn(name: str) -> str:
    """Lower-case and add the trailing dot."""
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


@lru_cache(maxsize=4096)
def pattern_regex(pattern: str) -> re.Pattern[str]:
    """Compile a `matchPattern` (or, without `*`, a `matchName`) to an anchored regex."""
    pattern = to_fqdn(pattern)
    if pattern == "*.":
        return re.compile(rf"^({_DNS_CHARS}+\.)+$|^\.$")
    out = []
    rest = pattern
    if rest.startswith("**."):
        out.append(rf"({_DNS_CHARS}+\.)+")
        rest = rest[3:]
    for ch in rest:
        if ch == "*":
            out.append(f"{_DNS_CHARS}*")
        else:
            out.append(re.escape(ch))
    return re.compile("^" + "".join(out) + "$")


def match_name(selector_name: str, name: str) -> bool:
    return to_fqdn(selector_name) == to_fqdn(name)


def match_pattern(pattern: str, name: str) -> bool:
    return pattern_regex(pattern).match(to_fqdn(name)) is not None


def selector_matches(match_name_: str | None, match_pattern_: str | None, name: str) -> bool:
    """True when an FQDN selector (`matchName` or `matchPattern`) matches `name`."""
    if match_name_ is not None:
        return match_name(match_name_, name)
    if match_pattern_ is not None:
        return match_pattern(match_pattern_, name)
    return False
