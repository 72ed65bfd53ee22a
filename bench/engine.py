"""Policy engine benchmark: full map-state computation and one-policy changes.

Endpoints come ten per identity (so N endpoints are N/10 computations), spread over ten
namespaces; rules are a realistic mix: label selectors, tier-wide selectors, CIDR sets with
excepts, port lists and ranges, some HTTP rules, some deny rules, some cluster-wide policies.

Prints a table and the growth exponents, saves JSON under bench/out/. Targets (issue 3):
1,000 endpoints x 1,000 rules under 2 s on one core; a one-policy change under 50 ms.
Run: .venv/bin/python bench/engine.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cilia.models import parse_documents
from cilia.policy.engine import PolicyEngine
from cilia.policy.inventory import Inventory, Workload
from cilia.policy.repository import Repository

NAMESPACES = [f"ns-{i}" for i in range(10)]
TIERS = ["web", "api", "db"]


def make_inventory(endpoints: int) -> Inventory:
    identities = max(1, endpoints // 10)
    workloads = []
    for n in range(endpoints):
        k = n % identities
        ns = NAMESPACES[k % len(NAMESPACES)]
        labels = {"app": f"app-{k}", "tier": TIERS[k % 3], "pod-template-hash": f"h{n}"}
        ip = ipaddress.ip_address(f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}") + (1 << 24) * 4
        workloads.append(Workload(ns, f"pod-{n}", labels, ip, {"http": (8080, 6)}))
    return Inventory(workloads, {ns: {"team": f"team-{i % 3}"} for i, ns in enumerate(NAMESPACES)})


def _ports(rng: random.Random) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.15:
            lo = rng.choice([8000, 9000, 30000])
            out.append({"port": str(lo), "endPort": lo + rng.choice([10, 99, 1000]), "protocol": "TCP"})
        elif rng.random() < 0.1:
            out.append({"port": "http", "protocol": "TCP"})
        else:
            out.append(
                {
                    "port": str(rng.choice([80, 443, 5432, 6379, 8080, 9090, 53])),
                    "protocol": rng.choice(["TCP", "TCP", "UDP", "ANY"]),
                }
            )
    return out


def make_rule(i: int, identities: int, rng: random.Random) -> dict[str, Any]:
    """One policy document; its subject is one identity (1% of endpoints at N=1,000) or a tier."""
    k = rng.randrange(identities)
    ns = NAMESPACES[k % len(NAMESPACES)]
    peer_k = rng.randrange(identities)
    kind = rng.random()
    subject: dict[str, Any] = {"matchLabels": {"app": f"app-{k}"}}
    spec: dict[str, Any] = {"endpointSelector": subject}
    if kind < 0.45:  # plain L3/L4 allow from a few apps
        peers = [
            {"matchLabels": {"app": f"app-{rng.randrange(identities)}"}} for _ in range(rng.randint(1, 3))
        ]
        spec["ingress"] = [{"fromEndpoints": peers, "toPorts": [{"ports": _ports(rng)}]}]
    elif kind < 0.55:  # tier-wide
        spec["endpointSelector"] = {"matchLabels": {"tier": TIERS[k % 3]}}
        spec["ingress"] = [
            {
                "fromEndpoints": [{"matchLabels": {"tier": TIERS[peer_k % 3]}}],
                "toPorts": [{"ports": _ports(rng)}],
            }
        ]
    elif kind < 0.70:  # CIDR egress with excepts
        a = rng.randrange(256)
        spec["egress"] = [
            {
                "toCIDRSet": [
                    {
                        "cidr": f"172.{a % 32 + 16}.0.0/16",
                        "except": [f"172.{a % 32 + 16}.{rng.randrange(256)}.0/24"],
                    }
                ],
                "toPorts": [{"ports": _ports(rng)}],
            },
            {"toCIDR": [f"203.0.{rng.randrange(256)}.0/24"]},
        ]
    elif kind < 0.80:  # HTTP rules
        spec["ingress"] = [
            {
                "fromEndpoints": [{"matchLabels": {"app": f"app-{peer_k}"}}],
                "toPorts": [
                    {
                        "ports": [{"port": "8080", "protocol": "TCP"}],
                        "rules": {"http": [{"method": "GET", "path": f"/api/v{rng.randint(1, 3)}/.*"}]},
                    }
                ],
            }
        ]
    elif kind < 0.90:  # deny
        spec["ingressDeny"] = [
            {
                "fromEndpoints": [{"matchLabels": {"app": f"app-{peer_k}"}}],
                "toPorts": [{"ports": _ports(rng)}],
            }
        ]
        spec["egressDeny"] = [{"toCIDR": [f"198.18.{rng.randrange(256)}.0/24"]}]
    elif kind < 0.95:  # egress to other namespaces by namespace label + DNS
        spec["egress"] = [
            {
                "toEndpoints": [
                    {
                        "matchLabels": {
                            "io.cilium.k8s.namespace.labels.team": f"team-{rng.randrange(3)}",
                            "tier": "api",
                        }
                    }
                ],
                "toPorts": [{"ports": _ports(rng)}],
            },
            {
                "toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "ns-0", "app": "app-0"}}],
                "toPorts": [
                    {
                        "ports": [{"port": "53", "protocol": "ANY"}],
                        "rules": {"dns": [{"matchPattern": "*.svc.cluster.local"}]},
                    }
                ],
            },
        ]
    else:  # cluster-wide
        spec["ingress"] = [{"fromEntities": ["cluster"], "toPorts": [{"ports": _ports(rng)}]}]
        return {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": f"ccnp-{i}"},
            "spec": spec,
        }
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": f"p-{i}", "namespace": ns},
        "spec": spec,
    }


def build(endpoints: int, rules: int, seed: int = 7) -> tuple[Inventory, Repository, list[dict[str, Any]]]:
    rng = random.Random(seed)
    inv = make_inventory(endpoints)
    docs = [make_rule(i, max(1, endpoints // 10), rng) for i in range(rules)]
    repo = Repository()
    repo.apply(parse_documents(docs))  # type: ignore[arg-type]
    return inv, repo, docs


def full_computation(endpoints: int, rules: int) -> dict[str, Any]:
    inv, repo, docs = build(endpoints, rules)
    gc.collect()
    t0 = time.perf_counter()
    engine = PolicyEngine(inv, repository=repo)
    policies = engine.compute_all()
    elapsed = time.perf_counter() - t0
    entries = sum(len(p.entries) for p in policies.values())
    change = one_policy_change(engine, docs, endpoints)
    return {
        "endpoints": endpoints,
        "identities": len(inv.cluster_identities()),
        "rules": rules,
        "subjects": len(policies),
        "entries": entries,
        "full_s": elapsed,
        **change,
    }


def one_policy_change(engine: PolicyEngine, docs: list[dict[str, Any]], endpoints: int) -> dict[str, Any]:
    """Replace one policy that selects one identity (10 endpoints) with a changed version; time the diff."""
    target = next(
        d
        for d in docs
        if d["kind"] == "CiliumNetworkPolicy"
        and "app" in d["spec"]["endpointSelector"].get("matchLabels", {})
    )
    times = []
    sizes = []
    recomputed = []
    for n in range(7):
        changed = json.loads(json.dumps(target))
        changed["spec"]["ingress"] = [
            {
                "fromEndpoints": [{"matchLabels": {"app": f"app-{n}"}}],
                "toPorts": [{"ports": [{"port": str(10000 + n), "protocol": "TCP"}]}],
            },
            {"fromCIDRSet": [{"cidr": f"100.64.{n}.0/24", "except": [f"100.64.{n}.128/25"]}]},
        ]
        objs = parse_documents([changed])
        gc.collect()
        t0 = time.perf_counter()
        update = engine.apply(objs)  # type: ignore[arg-type]
        times.append(time.perf_counter() - t0)
        sizes.append(sum(len(d) for d in update.diffs.values()))
        recomputed.append(update.recomputed + update.refreshed)
    selected = sum(
        1
        for w in engine.inventory.workloads.values()
        if w.labels.get("app") == target["spec"]["endpointSelector"]["matchLabels"]["app"]
    )
    return {
        "change_ms_median": statistics.median(times) * 1000,
        "change_ms_max": max(times) * 1000,
        "change_diff_entries": statistics.median(sizes),
        "change_subjects_touched": statistics.median(recomputed),
        "change_selects_endpoints_pct": 100.0 * selected / endpoints,
    }


def exponent(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(time) over log(size)."""
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller grid (100 and 1,000 endpoints)")
    args = parser.parse_args()
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says
    sizes = [100, 1000] if args.quick else [100, 1000, 5000]
    rule_counts = [100, 1000]
    results = []
    print(
        f"{'endpoints':>9} {'idents':>6} {'rules':>5} {'entries':>8} {'full (s)':>9} {'change (ms)':>12} {'diff':>6} {'touched':>7}"
    )
    for rules in rule_counts:
        for endpoints in sizes:
            r = full_computation(endpoints, rules)
            results.append(r)
            print(
                f"{r['endpoints']:>9} {r['identities']:>6} {r['rules']:>5} {r['entries']:>8} {r['full_s']:>9.3f}"
                f" {r['change_ms_median']:>12.2f} {r['change_diff_entries']:>6} {r['change_subjects_touched']:>7}"
            )
    growth = {}
    for rules in rule_counts:
        pts = [(r["endpoints"], r["full_s"]) for r in results if r["rules"] == rules]
        growth[f"endpoints@{rules}rules"] = exponent(pts)
    for endpoints in sizes:
        pts = [(r["rules"], r["full_s"]) for r in results if r["endpoints"] == endpoints]
        growth[f"rules@{endpoints}endpoints"] = exponent(pts)
    print("\ngrowth exponents (time ~ size^k):")
    for k, v in growth.items():
        print(f"  {k:>24}: {v:.2f}")
    target = next((r for r in results if r["endpoints"] == 1000 and r["rules"] == 1000), None)
    verdicts = {}
    if target:
        verdicts["full_1000x1000_under_2s"] = target["full_s"] < 2.0
        verdicts["one_policy_change_under_50ms"] = max(r["change_ms_median"] for r in results) < 50.0
        print(
            f"\n1,000 endpoints x 1,000 rules: {target['full_s']:.3f} s (target < 2 s): {'OK' if verdicts['full_1000x1000_under_2s'] else 'MISSED'}"
        )
        worst = max(r["change_ms_median"] for r in results)
        print(
            f"one-policy change, worst median: {worst:.2f} ms (target < 50 ms): {'OK' if verdicts['one_policy_change_under_50ms'] else 'MISSED'}"
        )
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    path = out / "engine.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": "engine",
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "python": platform.python_version(),
                "machine": platform.machine(),
                "results": results,
                "growth_exponents": growth,
                "targets": verdicts,
            },
            indent=2,
        )
    )
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
