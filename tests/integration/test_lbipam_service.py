"""LB-IPAM on a real nats-server: pools, reserved addresses, conflicts, requested addresses, sharing
keys, release on delete, ClusterIPs, all-or-nothing batches, and two replicas allocating at once."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ServerProcess, ServiceFactory
from deadline import eventually

from cilia import auth
from cilia.errors import ResourceError
from cilia.kvstore import KVStore, connect
from services.lbipam.store import LBIPAMStore

SATISFIED = "io.cilium/lb-ipam-request-satisfied"


def pool(name: str, *blocks: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2alpha1",
        "kind": "CiliumLoadBalancerIPPool",
        "metadata": {"name": name, "labels": spec.pop("labels", {})},
        "spec": {"blocks": list(blocks), **spec},
    }


def service(
    name: str,
    port: int = 80,
    namespace: str = "default",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels or {},
            "annotations": annotations or {},
        },
        "spec": {"type": "LoadBalancer", "selector": {"app": name}, "ports": [{"port": port}], **spec},
    }


def text(*docs: dict[str, Any]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


@pytest.fixture
async def kv(nats_server: ServerProcess) -> AsyncIterator[KVStore]:
    store = await connect(nats_server.url, timeout=5)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def buckets(bucket: str) -> dict[str, str]:
    return {
        "services_bucket": f"{bucket}s",
        "lbipam_bucket": f"{bucket}l",
        "leases_bucket": f"{bucket}e",
    }


@pytest.fixture
async def lb(kv: KVStore, buckets: dict[str, str]) -> LBIPAMStore:
    store = LBIPAMStore(kv, **buckets)
    await store.ensure_buckets()
    return store


async def svc(store: LBIPAMStore, name: str, namespace: str = "default") -> dict[str, Any]:
    doc = await store.get("Service", name, namespace)
    assert doc is not None
    return doc


def ips(doc: dict[str, Any]) -> list[str]:
    return [i["ip"] for i in doc.get("status", {}).get("loadBalancer", {}).get("ingress", [])]


def condition(doc: dict[str, Any], ctype: str = SATISFIED) -> dict[str, Any]:
    return next(c for c in doc.get("status", {}).get("conditions", []) if c["type"] == ctype)


async def test_a_loadbalancer_service_gets_an_address_of_a_matching_pool_never_network_or_broadcast(
    lb: LBIPAMStore,
) -> None:
    await lb.apply_text(
        text(pool("blue", {"cidr": "10.80.0.0/30"}, serviceSelector={"matchLabels": {"color": "blue"}}))
    )
    await lb.apply_text(text(*(service(f"s{i}", labels={"color": "blue"}) for i in range(3)), service("red")))
    got = {name: ips(await svc(lb, name)) for name in ("s0", "s1", "s2", "red")}
    assert sorted(got["s0"] + got["s1"]) == ["10.80.0.1", "10.80.0.2"]
    assert got["s2"] == [] and got["red"] == []
    assert condition(await svc(lb, "s0"))["status"] == "True"
    full = condition(await svc(lb, "s2"))
    assert (full["status"], full["reason"]) == ("False", "out_of_ips")
    red = condition(await svc(lb, "red"))
    assert (red["reason"], red["message"]) == (
        "no_pool",
        "There are no enabled CiliumLoadBalancerIPPools that match this service",
    )
    # The pool's counts, as `kubectl get ippools` shows them.
    p = await lb.get("CiliumLoadBalancerIPPool", "blue")
    assert p is not None
    conds = {c["type"]: c for c in p["status"]["conditions"]}
    assert conds["cilium.io/IPsTotal"]["message"] == "2"
    assert conds["cilium.io/IPsUsed"]["message"] == "2"
    assert conds["cilium.io/IPsAvailable"]["message"] == "0"
    assert conds["cilium.io/PoolConflict"]["status"] == "False"
    # allowFirstLastIPs: "Yes" makes the network and broadcast addresses allocatable too.
    await lb.apply_text(
        text(
            pool(
                "blue",
                {"cidr": "10.80.0.0/30"},
                serviceSelector={"matchLabels": {"color": "blue"}},
                allowFirstLastIPs="Yes",
            )
        )
    )
    assert ips(await svc(lb, "s2")) in (["10.80.0.0"], ["10.80.0.3"])
    # Deleting a service frees its address; the waiting one gets it.
    await lb.apply_text(text(service("s3", labels={"color": "blue"})))
    waiting = ips(await svc(lb, "s3"))
    assert waiting in ([], ["10.80.0.0"], ["10.80.0.3"])
    freed = ips(await svc(lb, "s0"))[0]
    await lb.delete("Service", "s0", "default")
    assert ips(await svc(lb, "s3")) in ([freed], waiting) and ips(await svc(lb, "s3"))
    assert all(a.ip != freed or "default/s3" in a.members for a in await lb.allocations())


async def test_a_range_reserves_nothing_and_a_single_start_is_one_address(lb: LBIPAMStore) -> None:
    await lb.apply_text(text(pool("r", {"start": "10.81.0.0", "stop": "10.81.0.1"}, {"start": "10.81.0.9"})))
    await lb.apply_text(text(*(service(f"s{i}") for i in range(4))))
    got = sorted([ip for i in range(4) for ip in ips(await svc(lb, f"s{i}"))])
    assert got == ["10.81.0.0", "10.81.0.1", "10.81.0.9"]


async def test_an_overlapping_newer_pool_is_flagged_and_does_not_allocate(lb: LBIPAMStore) -> None:
    await lb.apply_text(text(pool("blue", {"cidr": "10.82.0.0/24"})))
    await lb.apply_text(text(pool("red", {"cidr": "10.82.0.128/25"}, {"cidr": "10.83.0.0/24"})))
    red = await lb.get("CiliumLoadBalancerIPPool", "red")
    assert red is not None
    conflict = next(c for c in red["status"]["conditions"] if c["type"] == "cilium.io/PoolConflict")
    assert conflict["status"] == "True" and conflict["reason"] == "cidr_overlap"
    assert conflict["message"] == (
        "Pool conflicts since CIDR '10.82.0.128/25' overlaps CIDR '10.82.0.0/24' from IP Pool 'blue'"
    )
    blue = await lb.get("CiliumLoadBalancerIPPool", "blue")
    assert blue is not None
    assert (
        next(c for c in blue["status"]["conditions"] if c["type"] == "cilium.io/PoolConflict")["status"]
        == "False"
    )
    # A service that only the conflicting pool could serve gets nothing from it.
    await lb.apply_text(text(service("only-red", loadBalancerIP="10.83.0.7")))
    assert ips(await svc(lb, "only-red")) == []
    assert condition(await svc(lb, "only-red"))["reason"] == "no_pool"
    # The older pool goes: the conflict is resolved and red allocates.
    await lb.delete("CiliumLoadBalancerIPPool", "blue")
    assert ips(await svc(lb, "only-red")) == ["10.83.0.7"]
    red = await lb.get("CiliumLoadBalancerIPPool", "red")
    assert red is not None
    assert (
        next(c for c in red["status"]["conditions"] if c["type"] == "cilium.io/PoolConflict")["status"]
        == "False"
    )


async def test_requested_addresses_and_why_they_are_refused(lb: LBIPAMStore) -> None:
    await lb.apply_text(
        text(
            pool(
                "p",
                {"cidr": "10.84.0.0/24"},
                serviceSelector={"matchLabels": {"io.kubernetes.service.namespace": "a"}},
            )
        )
    )
    await lb.apply_text(
        text(
            service("one", namespace="a", annotations={"lbipam.cilium.io/ips": "10.84.0.10,10.84.0.11"}),
            service("two", namespace="a", loadBalancerIP="10.84.0.10"),
            service("three", namespace="b", loadBalancerIP="10.84.0.12"),
            service("four", namespace="a", loadBalancerIP="10.99.0.1"),
            service("five", namespace="a", loadBalancerIP="10.84.0.255"),
        )
    )
    assert ips(await svc(lb, "one", "a")) == ["10.84.0.10", "10.84.0.11"]
    assert condition(await svc(lb, "two", "a"))["reason"] == "already_allocated"
    assert condition(await svc(lb, "three", "b"))["reason"] == "pool_selector_mismatch"
    assert (
        condition(await svc(lb, "four", "a"))["message"]
        == "No pool exists with a CIDR containing '10.99.0.1'"
    )
    assert "reserved" in condition(await svc(lb, "five", "a"))["message"]
    # Dropping an address from the request releases it.
    await lb.apply_text(
        text(service("one", namespace="a", annotations={"lbipam.cilium.io/ips": "10.84.0.11"}))
    )
    assert ips(await svc(lb, "one", "a")) == ["10.84.0.11"]
    assert ips(await svc(lb, "two", "a")) == ["10.84.0.10"]


async def test_a_sharing_key_lets_services_share_an_address_on_different_ports(lb: LBIPAMStore) -> None:
    await lb.apply_text(text(pool("p", {"cidr": "10.85.0.0/24"})))
    key = {"lbipam.cilium.io/sharing-key": "web"}
    await lb.apply_text(
        text(
            service("http", 80, annotations=key),
            service("https", 443, annotations=key),
            service("http-again", 80, annotations=key),  # same port: needs another address
            service("alone", 8080),
            service("other-ns", 8443, namespace="x", annotations=key),  # not allowed across namespaces
        )
    )
    http, https = ips(await svc(lb, "http")), ips(await svc(lb, "https"))
    assert http == https and len(http) == 1
    again = ips(await svc(lb, "http-again"))
    assert again and again != http
    assert ips(await svc(lb, "alone")) not in (http, again)
    assert ips(await svc(lb, "other-ns", "x")) not in (http, again)
    allocs = {a.ip: a for a in await lb.allocations()}
    assert set(allocs[http[0]].members) == {"default/http", "default/https"}
    # Deleting one sharer keeps the address for the other; deleting both frees it.
    await lb.delete("Service", "http", "default")
    assert ips(await svc(lb, "https")) == http
    await lb.delete("Service", "https", "default")
    assert http[0] not in {a.ip for a in await lb.allocations()}


async def test_a_service_that_stops_being_a_loadbalancer_releases_its_address(lb: LBIPAMStore) -> None:
    await lb.apply_text(text(pool("p", {"cidr": "10.86.0.0/29"})))
    await lb.apply_text(text(service("s")))
    assert ips(await svc(lb, "s"))
    doc = service("s")
    doc["spec"]["type"] = "ClusterIP"
    await lb.apply_text(text(doc))
    stored = await svc(lb, "s")
    assert stored["status"] == {"loadBalancer": {}}
    assert await lb.allocations() == []


async def test_cluster_ips_come_from_the_service_cidr_and_are_immutable(lb: LBIPAMStore) -> None:
    doc = service("c")
    doc["spec"]["type"] = "ClusterIP"
    (change,) = await lb.apply_text(text(doc))
    assert change.action == "created"
    stored = await svc(lb, "c")
    cip = stored["spec"]["clusterIP"]
    assert ipaddress.ip_address(cip) in ipaddress.ip_network("10.96.0.0/16")
    assert stored["spec"]["clusterIPs"] == [cip]
    assert stored["spec"]["ports"][0] == {"port": 80, "protocol": "TCP", "targetPort": 80}
    assert (await lb.apply_text(text(doc)))[0].action == "unchanged"
    other = service("d")
    other["spec"].update(type="ClusterIP", clusterIP=cip)
    with pytest.raises(ResourceError) as err:
        await lb.apply_text(text(other))
    assert (
        str(err.value)
        == f"Service default/d: spec.clusterIP: Invalid value: '{cip}': provided IP is already allocated"
    )
    doc["spec"]["clusterIP"] = "10.96.7.7" if cip != "10.96.7.7" else "10.96.7.8"
    with pytest.raises(ResourceError, match="field is immutable"):
        await lb.apply_text(text(doc))
    await lb.delete("Service", "c", "default")
    other["spec"]["clusterIP"] = cip
    await lb.apply_text(text(other))
    assert (await svc(lb, "d"))["spec"]["clusterIP"] == cip


async def test_a_rejected_batch_changes_nothing(lb: LBIPAMStore) -> None:
    taken = service("t")
    taken["spec"].update(type="ClusterIP", clusterIP="10.96.1.1")
    await lb.apply_text(text(taken))
    before = await lb.list_kind("Service")
    bad = service("x")
    bad["spec"].update(type="ClusterIP", clusterIP="10.96.1.1")
    with pytest.raises(ResourceError):
        await lb.apply_text(text(pool("p", {"cidr": "10.87.0.0/24"}), service("y"), bad))
    assert await lb.list_kind("Service") == before
    assert await lb.list_kind("CiliumLoadBalancerIPPool") == []
    # The ClusterIP that `y` had claimed during the batch was given back.
    keys = [e.key for e in await lb.kv.list(f"{lb.lbipam}/clusterips/")]
    assert keys == [f"{lb.lbipam}/clusterips/10.96.1.1"]


async def test_two_replicas_allocating_at_once_never_hand_one_address_to_two_services(
    nats_server: ServerProcess, buckets: dict[str, str]
) -> None:
    stores = []
    kvs = [await connect(nats_server.url, timeout=5) for _ in range(2)]
    try:
        stores = [LBIPAMStore(kv, **buckets) for kv in kvs]
        await stores[0].ensure_buckets()
        await stores[0].apply_text(text(pool("p", {"cidr": "10.88.0.0/28"})))  # 14 addresses
        names = [f"s{i}" for i in range(20)]
        # Each replica applies every service (as two clients racing would) and reconciles.
        await asyncio.gather(
            *(
                stores[i % 2].apply_text(text(service(n, 8000 + i, annotations=_share(i))))
                for i, n in enumerate(names)
            ),
            *(
                stores[1 - i % 2].apply_text(text(service(n, 8000 + i, annotations=_share(i))))
                for i, n in enumerate(names)
            ),
        )
        await asyncio.gather(stores[0].reconcile(), stores[1].reconcile())
        holders: dict[str, list[str]] = {}
        for n in names:
            doc = await svc(stores[0], n)
            got = ips(doc)
            assert len(got) <= 1, (n, got)
            for ip in got:
                holders.setdefault(ip, []).append(n)
        allocs = {a.ip: a for a in await stores[0].allocations()}
        for ip, who in holders.items():
            members = set(allocs[ip].members)
            assert {f"default/{w}" for w in who} <= members
            if len(who) > 1:  # only services with one sharing key and different ports share
                keys = {
                    (await svc(stores[0], w))["metadata"]["annotations"].get("lbipam.cilium.io/sharing-key")
                    for w in who
                }
                assert len(keys) == 1 and None not in keys, (ip, who)
        assert len(allocs) <= 14
        # Every service without an address is waiting because the pool is full.
        for n in names:
            doc = await svc(stores[0], n)
            if not ips(doc):
                assert condition(doc)["reason"] == "out_of_ips"
        # No membership without the address in that service's status (nothing leaked).
        for a in allocs.values():
            for member in a.members:
                ns, _, name = member.partition("/")
                assert a.ip in ips(await svc(stores[0], name, ns)), (a.ip, member)
    finally:
        for kv in kvs:
            await kv.close()


def _share(i: int) -> dict[str, str]:
    # Two pairs share a key (ports differ: each service uses its own port below).
    return {"lbipam.cilium.io/sharing-key": "pair"} if i in (3, 4) else {}


# --- the service process ---------------------------------------------------------------------


def http(method: str, url: str, body: str | None = None, token: str | None = None) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        url, data=body.encode() if body else None, method=method, headers={"content-type": "application/yaml"}
    )
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


@pytest.fixture
def creds(tmp_path: Path) -> tuple[auth.Credentials, Path]:
    c = auth.generate()
    return c, auth.write(c, tmp_path / "credentials.yaml")


async def test_two_lbipam_services_share_the_work_and_agree(
    start_service: ServiceFactory,
    nats_server: ServerProcess,
    buckets: dict[str, str],
    creds: tuple[auth.Credentials, Path],
    kv: KVStore,
) -> None:
    env = {
        "CILIA_NATS_URL": nats_server.url,
        "CILIA_TOKEN_FILE": str(creds[1]),
        **{f"CILIA_{k.upper()}": v for k, v in buckets.items()},
    }
    a = start_service("lbipam", **env)
    b = start_service("lbipam", **env)
    token = creds[0].tokens["admin"]
    code, body = http("POST", f"{a.url}/v1/resources", text(pool("p", {"cidr": "10.89.0.0/29"})), token)
    assert code == 200, body
    assert body["changes"] == [
        {"kind": "CiliumLoadBalancerIPPool", "namespace": None, "name": "p", "action": "created"}
    ]
    code, body = http("POST", f"{b.url}/v1/resources", text(service("web")), token)
    assert code == 200 and body["changes"][0]["action"] == "created"
    code, doc = http("GET", f"{a.url}/v1/resources/svc/web?namespace=default", token=token)
    assert code == 200 and ips(doc) == ["10.89.0.1"]
    # Bad input: one line naming document and field, nothing applied, 401 without a token.
    bad = text(service("ok2"), {**service("bad"), "spec": {"type": "LoadBalancer", "ports": [{"port": 0}]}})
    code, body = http("POST", f"{a.url}/v1/resources", bad, token)
    assert code == 422 and body["error"].startswith("Service default/bad: spec.ports[0].port")
    assert http("GET", f"{a.url}/v1/resources/svc/ok2", token=token)[0] == 404
    assert http("POST", f"{a.url}/v1/resources", text(service("x")))[0] == 401
    # A pool applied on one replica, a delete on the other: both see the same allocations.
    code, _ = http("DELETE", f"{b.url}/v1/resources/ippools/p", token=token)
    assert code == 200

    async def pending() -> bool:
        _, d = http("GET", f"{a.url}/v1/resources/svc/web", token=token)
        return not ips(d) and condition(d)["reason"] == "no_pool"

    await eventually(pending, what="the service losing its address with its pool")


async def test_without_pools_lbipam_is_dormant_and_an_ingress_in_a_pool_is_adopted(lb: LBIPAMStore) -> None:
    # A Service written straight to the kvstore with an address set by someone else (as the datapath
    # tests do): with no pool LB-IPAM leaves it alone, as Cilium's dormant LB-IPAM does.
    doc = service("static")
    doc["spec"]["clusterIP"] = "10.96.9.9"
    doc["status"] = {"loadBalancer": {"ingress": [{"ip": "198.18.0.10"}]}}
    await lb.kv.put(lb.service_key("default", "static"), json.dumps(doc).encode())
    await lb.reconcile()
    assert ips(await svc(lb, "static")) == ["198.18.0.10"]
    assert "conditions" not in (await svc(lb, "static"))["status"]
    # Once a pool holds that address, LB-IPAM adopts it (Cilium's import of existing ingresses)...
    await lb.apply_text(text(pool("p", {"cidr": "198.18.0.0/24"})))
    assert ips(await svc(lb, "static")) == ["198.18.0.10"]
    assert [a.ip for a in await lb.allocations()] == ["198.18.0.10"]
    assert condition(await svc(lb, "static"))["status"] == "True"
    # ...and when the last pool goes, takes it back and says why.
    await lb.delete("CiliumLoadBalancerIPPool", "p")
    doc = await svc(lb, "static")
    assert ips(doc) == [] and condition(doc)["reason"] == "no_pool"
    assert await lb.allocations() == []
