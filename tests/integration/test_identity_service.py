"""The identity service against a real nats-server and a real etcd: allocation over HTTP and NATS,
and uniqueness under concurrent allocators with a replica killed midway, on both kvstore backends."""

from __future__ import annotations

import asyncio
import json
import random
import urllib.request
from collections import defaultdict
from typing import Any

import nats
import pytest
from conftest import ServerProcess, ServiceFactory
from deadline import eventually

from cilia import bus
from cilia.kvstore import connect
from services.identity.allocator import IdentityAllocator
from services.identity.models import AllocateRequest, IdentityReply

XWING = ["k8s:org=alliance", "k8s:class=xwing", "k8s:io.kubernetes.pod.namespace=default"]


def http(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def env(nats_url: str, kvstore: str, bucket: str, **extra: str) -> dict[str, str]:
    return {
        "CILIA_NATS_URL": nats_url,
        "CILIA_KVSTORE": kvstore,
        "CILIA_IDENTITY_BUCKET": bucket,
        "CILIA_ANONYMOUS_READ": "true",
        **extra,
    }


async def test_same_label_set_gets_the_same_identity_over_http_and_nats(
    start_service: ServiceFactory, nats_server: ServerProcess, bucket: str, tmp_path: Any
) -> None:
    from cilia import auth

    creds = auth.generate()
    token_file = auth.write(creds, tmp_path / "creds.yaml")
    svc = start_service("identity", **env(nats_server.url, "nats", bucket, CILIA_TOKEN_FILE=str(token_file)))
    status, first = http("POST", f"{svc.url}/v1/identities", {"labels": XWING}, creds.tokens["agent"])
    assert status == 200, first
    assert 256 <= first["id"] <= 65535
    # Order and non-security labels (pod-template-hash) never matter.
    shuffled = [XWING[2], "k8s:pod-template-hash=5f7d", XWING[0], XWING[1]]
    status, again = http("POST", f"{svc.url}/v1/identities", {"labels": shuffled}, creds.tokens["admin"])
    assert (status, again["id"]) == (200, first["id"])
    assert sorted(again["labels"]) == sorted(XWING)
    nc = await nats.connect(nats_server.url)
    try:
        reply = await bus.request(nc, bus.IDENTITY_ALLOCATE, AllocateRequest(labels=XWING), IdentityReply)
    finally:
        await nc.close()
    assert reply.id == first["id"]
    status, got = http("GET", f"{svc.url}/v1/identities/{first['id']}")
    assert status == 200 and sorted(got["labels"]) == sorted(XWING)
    status, listing = http("GET", f"{svc.url}/v1/identities")
    assert [i["id"] for i in listing["items"]] == [first["id"]]


async def test_reserved_labels_get_reserved_numbers_and_are_never_stored(
    nats_server: ServerProcess, bucket: str
) -> None:
    kv = await connect(nats_server.url)
    try:
        allocator = IdentityAllocator(kv, bucket=bucket)
        host = await allocator.allocate(["reserved:host"])
        world = await allocator.allocate(["reserved:world"])
        assert (host.id, world.id) == (1, 2)
        assert await kv.list(f"{bucket}/") == []
    finally:
        await kv.close()


async def test_a_label_set_without_security_labels_is_refused(
    start_service: ServiceFactory, nats_server: ServerProcess, bucket: str, tmp_path: Any
) -> None:
    from cilia import auth

    creds = auth.generate()
    svc = start_service(
        "identity",
        **env(nats_server.url, "nats", bucket, CILIA_TOKEN_FILE=str(auth.write(creds, tmp_path / "c.yaml"))),
    )
    status, body = http(
        "POST", f"{svc.url}/v1/identities", {"labels": ["k8s:pod-template-hash=1"]}, creds.tokens["admin"]
    )
    assert status == 422
    assert "no security-relevant labels" in body["error"]


async def test_unused_identities_are_garbage_collected_only_after_the_grace_period(
    nats_server: ServerProcess, bucket: str
) -> None:
    kv = await connect(nats_server.url)
    try:
        allocator = IdentityAllocator(kv, bucket=bucket)
        used = await allocator.allocate(XWING, holder="node-1")
        unused = await allocator.allocate(["k8s:app=tmp"])
        assert await allocator.gc(grace_seconds=60, now=1000.0) == []  # first sighting starts the clock
        assert await allocator.gc(grace_seconds=60, now=1030.0) == []  # still within grace
        assert await allocator.gc(grace_seconds=60, now=1061.0) == [unused.id]
        assert await allocator.get(used.id) is not None
        assert await allocator.get(unused.id) is None
        await allocator.release(used.id, "node-1")
        await allocator.gc(grace_seconds=60, now=2000.0)
        assert await allocator.gc(grace_seconds=60, now=2061.0) == [used.id]
    finally:
        await kv.close()


@pytest.mark.parametrize("backend", ["nats", "etcd"])
async def test_concurrent_allocation_gives_one_number_per_label_set_even_when_a_replica_dies(
    backend: str,
    start_service: ServiceFactory,
    nats_server: ServerProcess,
    etcd_server: ServerProcess,
    bucket: str,
) -> None:
    """3 replicas, 8 clients, 2,000 overlapping label sets, one replica SIGKILLed midway."""
    etcd_server.start()
    kvstore = "nats" if backend == "nats" else etcd_server.url
    replicas = [start_service("identity", **env(nats_server.url, kvstore, bucket)) for _ in range(3)]
    sets = [
        [f"k8s:app=app-{i}", f"k8s:io.kubernetes.pod.namespace=ns-{i % 7}", f"k8s:tier=t{i % 3}"]
        for i in range(2000)
    ]
    seen: dict[int, set[int]] = defaultdict(set)
    failures: list[str] = []
    retries = 0
    done = 0
    nc = await nats.connect(nats_server.url)

    async def client(c: int) -> None:
        nonlocal retries, done
        mine = [i for i in range(len(sets)) if (i + c) % 2 == 0]  # each set is allocated by 4 clients
        random.Random(c).shuffle(mine)
        for i in mine:
            for _attempt in range(100):
                try:
                    reply = await bus.request(
                        nc, bus.IDENTITY_ALLOCATE, AllocateRequest(labels=sets[i]), IdentityReply, 2.0
                    )
                except bus.BusError as err:
                    if "nobody answers" in str(err) or "no answer" in str(err):
                        retries += 1
                        await asyncio.sleep(0.02)
                        continue
                    failures.append(f"{i}: {err}")
                    break
                seen[i].add(reply.id)
                done += 1
                break
            else:
                failures.append(f"{i}: no answer after 100 attempts")

    async def progressed() -> bool:
        return done >= 3000

    async def killer() -> None:
        await eventually(progressed, timeout=60, what="3,000 allocations")
        await asyncio.to_thread(replicas[0].kill)

    try:
        await asyncio.gather(killer(), *(client(c) for c in range(8)))
    finally:
        await nc.close()
    assert failures == []
    assert len(seen) == len(sets)
    assert all(len(ids) == 1 for ids in seen.values()), {i: ids for i, ids in seen.items() if len(ids) > 1}
    numbers = [next(iter(ids)) for ids in seen.values()]
    assert len(set(numbers)) == len(numbers)  # no number shared by two label sets
    kv = await connect(kvstore, nats_server.url)
    try:
        by_labels = {json.loads(e.value)["id"] for e in await kv.list(f"{bucket}/labels/")}
        assert by_labels == set(numbers)
    finally:
        await kv.close()


async def test_a_new_identity_is_announced_on_the_identity_events_subject(
    start_service: ServiceFactory, nats_server: ServerProcess, bucket: str
) -> None:
    from services.identity.models import IdentityEvent

    start_service("identity", **env(nats_server.url, "nats", bucket))
    nc = await nats.connect(nats_server.url)
    events: list[IdentityEvent] = []

    async def on_event(msg: Any) -> None:
        events.append(IdentityEvent.model_validate_json(msg.data))

    try:
        await nc.subscribe(bus.IDENTITY_EVENTS, cb=on_event)
        await nc.flush()
        labels = [f"k8s:app=evt-{bucket}"]
        first = await bus.request(nc, bus.IDENTITY_ALLOCATE, AllocateRequest(labels=labels), IdentityReply)
        await bus.request(nc, bus.IDENTITY_ALLOCATE, AllocateRequest(labels=labels), IdentityReply)

        async def announced() -> bool:
            return any(e.id == first.id for e in events)

        await eventually(announced, what="an identity event")
        assert [e.type for e in events if e.id == first.id] == ["added"]  # once, not per request
    finally:
        await nc.close()
