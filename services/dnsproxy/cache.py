"""The FQDN cache: which names resolved to which IPs for which endpoint, and until when.

As Cilium's per-endpoint DNS history: each endpoint keeps its own lookups (name -> IP -> expiry,
with a minimum TTL and a cap on IPs per name, oldest evicted first); an IP keeps a name as long as
some endpoint's lookup holds it. A lookup that expires while a connection still uses the IP
becomes a *zombie* (Cilium's "connection" source) and is kept until the connection ends.

`acked` is the part of the cache the datapath holds (what `allow_fqdn` confirmed): the proxy
releases an answer only once the pairs it needs are acked, and forgets in the datapath only what
was acked. Pure: times are passed in (wall-clock seconds, so a saved cache survives a restart).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Pair = tuple[str, str]  # (ip, name)


@dataclass
class Lookup:
    """One IP of one name for one endpoint."""

    expires: float
    ttl: int
    looked_up: float


@dataclass
class EndpointCache:
    id: int
    name: str  # namespace/pod, for people
    names: dict[str, dict[str, Lookup]] = field(default_factory=dict)


@dataclass
class Zombie:
    """An expired pair whose IP an open connection still used at the last check."""

    since: float
    endpoints: tuple[int, ...]


@dataclass
class Row:
    """One line of `cilia fqdn cache list`."""

    endpoint: int
    endpoint_name: str
    source: str  # "lookup" or "connection"
    name: str
    ttl: int
    expires: float | None
    ips: list[str]

    def to_dict(self, selectors: list[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "endpoint": self.endpoint,
            "endpointName": self.endpoint_name,
            "source": self.source,
            "fqdn": self.name,
            "ttl": self.ttl,
            "expirationTime": rfc3339_milli(self.expires) if self.expires is not None else None,
            "ips": self.ips,
        }
        if selectors is not None:
            out["selectors"] = selectors
        return out


def rfc3339_milli(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class FQDNCache:
    """Per-endpoint lookups, zombies, and the acked set (see the module docstring)."""

    def __init__(self, min_ttl: int = 0, max_ips_per_host: int = 1000) -> None:
        self.min_ttl = min_ttl
        self.max_ips_per_host = max_ips_per_host
        self.endpoints: dict[int, EndpointCache] = {}
        self.zombies: dict[Pair, Zombie] = {}
        self.acked: set[Pair] = set()
        self._holders: dict[Pair, set[int]] = {}  # pair -> endpoints whose lookups hold it
        self.endpoint_names: dict[int, str] = {}  # kept after an endpoint's last lookup (zombies)
        self.version = 0  # bumped when pairs come or go (what must be saved soon)
        self.refreshed = 0  # bumped when a lookup only moved an expiry (can be saved lazily)

    # --- lookups ---------------------------------------------------------------------------

    def update(
        self, endpoint: int, endpoint_name: str, name: str, ips: Iterable[str], ttl: int, now: float
    ) -> list[Pair]:
        """Record an answer; returns its pairs (ip, name), in answer order."""
        ttl = max(int(ttl), self.min_ttl)
        ep = self.endpoints.get(endpoint)
        if ep is None:
            ep = self.endpoints[endpoint] = EndpointCache(endpoint, endpoint_name)
        elif endpoint_name:
            ep.name = endpoint_name
        self.endpoint_names[endpoint] = ep.name
        per_name = ep.names.setdefault(name, {})
        pairs = []
        for ip in dict.fromkeys(ips):
            if per_name.pop(ip, None) is None:  # re-insert: dict order is lookup order (oldest first)
                self.version += 1
            else:
                self.refreshed += 1
            per_name[ip] = Lookup(now + ttl, ttl, now)
            pair = (ip, name)
            self._holders.setdefault(pair, set()).add(endpoint)
            self.zombies.pop(pair, None)
            pairs.append(pair)
        if len(per_name) > self.max_ips_per_host:
            # The cap (Cilium's --tofqdns-endpoint-max-ip-per-hostname): the oldest IPs go first.
            # They expire now; the next collection releases them as any expired lookup.
            oldest = sorted(per_name.items(), key=lambda kv: (kv[1].expires, kv[1].looked_up))
            for _ip, lookup in oldest[: len(per_name) - self.max_ips_per_host]:
                lookup.expires = min(lookup.expires, now)
        return pairs

    def live(self) -> dict[str, set[str]]:
        """ip -> names held by a lookup (expired or not, until collected) or by a zombie."""
        out: dict[str, set[str]] = {}
        for ip, name in [*self._holders, *self.zombies]:
            out.setdefault(ip, set()).add(name)
        return out

    def pairs(self) -> set[Pair]:
        return set(self._holders) | set(self.zombies)

    def collect(self, now: float) -> list[Pair]:
        """Drop expired lookups; returns the pairs no lookup holds any more (zombie candidates)."""
        released: list[Pair] = []
        for ep in list(self.endpoints.values()):
            for name, per_name in list(ep.names.items()):
                for ip, lookup in list(per_name.items()):
                    if lookup.expires > now:
                        continue
                    del per_name[ip]
                    self.version += 1
                    holders = self._holders.get((ip, name))
                    if holders is not None:
                        holders.discard(ep.id)
                        if not holders:
                            del self._holders[(ip, name)]
                            zombie = self.zombies.get((ip, name))
                            self.zombies[(ip, name)] = Zombie(
                                zombie.since if zombie else now,
                                tuple(sorted({*(zombie.endpoints if zombie else ()), ep.id})),
                            )
                            released.append((ip, name))
                if not per_name:
                    del ep.names[name]
            if not ep.names:
                del self.endpoints[ep.id]
        return released

    def forget(self, pairs: Iterable[Pair]) -> None:
        """These zombies' connections are gone (or they were never in use): drop them."""
        for pair in pairs:
            if self.zombies.pop(pair, None) is not None:
                self.version += 1
            self.acked.discard(pair)

    def next_expiry(self) -> float | None:
        soonest: float | None = None
        for ep in self.endpoints.values():
            for per_name in ep.names.values():
                for lookup in per_name.values():
                    if soonest is None or lookup.expires < soonest:
                        soonest = lookup.expires
        return soonest

    # --- views ----------------------------------------------------------------------------

    def rows(self, now: float) -> list[Row]:
        """The cache as `cilium-dbg fqdn cache list` shows it: a row per endpoint, source, name
        and lookup (IPs of one answer share their TTL and expiry)."""
        out: list[Row] = []
        for ep in sorted(self.endpoints.values(), key=lambda e: e.id):
            for name in sorted(ep.names):
                groups: dict[tuple[int, float], list[str]] = {}
                for ip, lookup in ep.names[name].items():
                    groups.setdefault((lookup.ttl, lookup.expires), []).append(ip)
                for (ttl, expires), ips in sorted(groups.items(), key=lambda kv: kv[0][1]):
                    out.append(Row(ep.id, ep.name, "lookup", name, ttl, expires, sorted(ips, key=_ip_key)))
        by_zombie: dict[tuple[int, str], list[str]] = {}
        for (ip, name), zombie in self.zombies.items():
            for ep_id in zombie.endpoints or (0,):
                by_zombie.setdefault((ep_id, name), []).append(ip)
        for (ep_id, name), ips in sorted(by_zombie.items()):
            ep_name = self.endpoint_names.get(ep_id, "")
            out.append(Row(ep_id, ep_name, "connection", name, 0, None, sorted(ips, key=_ip_key)))
        return out

    # --- persistence ----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "endpoints": [
                {
                    "id": ep.id,
                    "name": ep.name,
                    "names": {
                        name: {ip: [lk.expires, lk.ttl, lk.looked_up] for ip, lk in per_name.items()}
                        for name, per_name in ep.names.items()
                    },
                }
                for ep in self.endpoints.values()
            ],
            "zombies": [[ip, name, z.since, list(z.endpoints)] for (ip, name), z in self.zombies.items()],
            "endpointNames": {str(k): v for k, v in self.endpoint_names.items()},
        }

    def load_json(self, doc: Mapping[str, Any], slack: float = 0.0) -> None:
        """Restore a saved cache (what a restarted proxy starts from). Expiries move `slack`
        seconds later: refreshes are saved lazily, so a saved expiry may be that much early."""
        if doc.get("version") != 1:
            raise ValueError(f"unknown cache file version {doc.get('version')!r}")
        for raw in doc.get("endpoints", []):
            ep_id = int(raw["id"])
            ep = self.endpoints.setdefault(ep_id, EndpointCache(ep_id, str(raw.get("name", ""))))
            self.endpoint_names[ep_id] = ep.name
            for name, ips in (raw.get("names") or {}).items():
                per_name = ep.names.setdefault(str(name), {})
                for ip, (expires, ttl, looked_up) in ips.items():
                    per_name[str(ip)] = Lookup(float(expires) + slack, int(ttl), float(looked_up))
                    self._holders.setdefault((str(ip), str(name)), set()).add(ep_id)
        for key, value in (doc.get("endpointNames") or {}).items():
            self.endpoint_names.setdefault(int(key), str(value))
        for ip, name, since, eps in doc.get("zombies", []):
            if (ip, name) not in self._holders:
                self.zombies[(str(ip), str(name))] = Zombie(float(since), tuple(int(e) for e in eps))


def _ip_key(ip: str) -> tuple[int, str]:
    return (1 if ":" in ip else 0, ip)


def dumps(cache: FQDNCache) -> str:
    return json.dumps(cache.to_json(), separators=(",", ":"))
