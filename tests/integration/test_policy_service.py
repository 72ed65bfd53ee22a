"""The policy service against a real nats-server (and etcd): kubectl-apply semantics, all-or-nothing
batches, revisions and events, watchers, restarts, trace."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from conftest import ServerProcess, ServiceFactory
from deadline import eventually

from cilia import auth, bus
from cilia.kvstore import EventKind, connect
from services.policy.models import RevisionEvent

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def starwars_step(i: int) -> str:
    doc = yaml.safe_load((EXAMPLES / "starwars.yaml").read_text())
    return yaml.safe_dump_all(doc["steps"][i]["apply"], sort_keys=False)


def request(
    method: str, url: str, body: str | dict[str, Any] | None = None, token: str | None = None
) -> tuple[int, Any]:
    data: bytes | None
    if isinstance(body, dict):
        data, ctype = json.dumps(body).encode(), "application/json"
    else:
        data, ctype = (body.encode() if body is not None else None), "application/yaml"
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": ctype})
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


@pytest.fixture
def creds(tmp_path: Path) -> tuple[auth.Credentials, Path]:
    c = auth.generate()
    return c, auth.write(c, tmp_path / "credentials.yaml")


@pytest.fixture
def policy_service(
    start_service: ServiceFactory,
    nats_server: ServerProcess,
    bucket: str,
    creds: tuple[auth.Credentials, Path],
) -> ServerProcess:
    return start_service(
        "policy",
        CILIA_NATS_URL=nats_server.url,
        CILIA_POLICY_BUCKET=bucket,
        CILIA_TOKEN_FILE=str(creds[1]),
    )


def test_apply_creates_then_reports_unchanged_then_configured(
    policy_service: ServerProcess, creds: tuple[auth.Credentials, Path]
) -> None:
    token = creds[0].tokens["admin"]
    status, first = request("POST", f"{policy_service.url}/v1/policies", starwars_step(1), token)
    assert status == 200, first
    assert first["changes"] == [
        {"kind": "CiliumNetworkPolicy", "namespace": "default", "name": "rule1", "action": "created"}
    ]
    status, again = request("POST", f"{policy_service.url}/v1/policies", starwars_step(1), token)
    assert again["changes"][0]["action"] == "unchanged" and again["revision"] == first["revision"]
    status, l7 = request("POST", f"{policy_service.url}/v1/policies", starwars_step(2), token)
    assert l7["changes"][0]["action"] == "configured" and l7["revision"] == first["revision"] + 1
    status, got = request("GET", f"{policy_service.url}/v1/policies/cnp/rule1?namespace=default", token=token)
    assert status == 200
    assert got["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"] == [
        {"method": "POST", "path": "/v1/request-landing"}
    ]
    status, deleted = request(
        "DELETE", f"{policy_service.url}/v1/policies/CiliumNetworkPolicy/rule1", token=token
    )
    assert status == 200 and deleted["revision"] == l7["revision"] + 1
    status, listing = request("GET", f"{policy_service.url}/v1/policies", token=token)
    assert listing["items"] == []
    status, missing = request(
        "DELETE", f"{policy_service.url}/v1/policies/CiliumNetworkPolicy/rule1", token=token
    )
    assert status == 404 and "not found" in missing["error"]


def test_a_batch_with_one_invalid_document_is_rejected_whole_and_changes_nothing(
    policy_service: ServerProcess, creds: tuple[auth.Credentials, Path]
) -> None:
    token = creds[0].tokens["admin"]
    request("POST", f"{policy_service.url}/v1/policies", starwars_step(1), token)
    before = request("GET", f"{policy_service.url}/v1/policies", token=token)[1]
    good = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "good"},
        "spec": {"endpointSelector": {}, "ingress": [{}]},
    }
    bad = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "bad"},
        "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "99999"}]}]}]},
    }
    changed_rule1 = yaml.safe_load(starwars_step(2))
    status, body = request(
        "POST", f"{policy_service.url}/v1/policies", yaml.safe_dump_all([good, changed_rule1, bad]), token
    )
    assert status == 422
    assert body["document"] == "CiliumNetworkPolicy default/bad"
    assert body["field"] == "spec.ingress[0].toPorts[0].ports[0].port"
    after = request("GET", f"{policy_service.url}/v1/policies", token=token)[1]
    assert after == before


async def test_every_change_bumps_the_revision_and_publishes_an_event(
    policy_service: ServerProcess, nats_server: ServerProcess, creds: tuple[auth.Credentials, Path]
) -> None:
    token = creds[0].tokens["admin"]
    nc = await nats.connect(nats_server.url)
    events: list[int] = []

    async def on_event(msg: Any) -> None:
        events.append(RevisionEvent.model_validate_json(msg.data).revision)

    await nc.subscribe(bus.POLICY_REVISION, cb=on_event)
    await nc.flush()
    try:
        r1 = (
            await asyncio.to_thread(
                request, "POST", f"{policy_service.url}/v1/policies", starwars_step(1), token
            )
        )[1]
        r2 = (
            await asyncio.to_thread(
                request, "POST", f"{policy_service.url}/v1/policies", starwars_step(2), token
            )
        )[1]

        async def both() -> bool:
            return events == [r1["revision"], r2["revision"]]

        await eventually(both, what="two revision events")
        assert r2["revision"] == r1["revision"] + 1
    finally:
        await nc.close()


async def test_a_watcher_gets_the_full_state_first_and_the_state_survives_a_restart(
    start_service: ServiceFactory,
    policy_service: ServerProcess,
    nats_server: ServerProcess,
    bucket: str,
    creds: tuple[auth.Credentials, Path],
) -> None:
    token = creds[0].tokens["admin"]
    await asyncio.to_thread(request, "POST", f"{policy_service.url}/v1/policies", starwars_step(1), token)
    kv = await connect("nats", nats_server.url)
    try:
        seen: list[str] = []
        async with kv.watch(f"{bucket}/items/") as events:
            async for ev in events:
                if ev.kind is EventKind.LIST_DONE:
                    break
                seen.append(ev.key)
        assert seen == [f"{bucket}/items/CiliumNetworkPolicy/default/rule1"]
    finally:
        await kv.close()
    await asyncio.to_thread(policy_service.stop)
    await asyncio.to_thread(policy_service.start)
    _status, listing = await asyncio.to_thread(
        request, "GET", f"{policy_service.url}/v1/policies", None, token
    )
    assert [i["name"] for i in listing["items"]] == ["rule1"]


def test_trace_names_the_rule_that_decided(
    policy_service: ServerProcess, creds: tuple[auth.Credentials, Path]
) -> None:
    token = creds[0].tokens["admin"]
    request("POST", f"{policy_service.url}/v1/policies", starwars_step(2), token)
    tie = {"labels": ["org=empire", "class=tiefighter"]}
    star = {"labels": ["org=empire", "class=deathstar"]}
    xwing = {"labels": ["org=alliance", "class=xwing"]}
    url = f"{policy_service.url}/v1/policy/trace"
    ok = request(
        "POST",
        url,
        {"from": tie, "to": star, "port": 80, "http": {"method": "POST", "path": "/v1/request-landing"}},
        token,
    )[1]
    assert ok["allowed"] is True and ok["reason"] == "default/rule1 ingress[0] http[0]"
    no = request(
        "POST",
        url,
        {"from": tie, "to": star, "port": 80, "http": {"method": "PUT", "path": "/v1/exhaust-port"}},
        token,
    )[1]
    assert no["allowed"] is False and no["reason"].startswith("l7-deny")
    denied = request("POST", url, {"from": xwing, "to": star, "port": 80}, token)[1]
    assert denied["allowed"] is False
    assert denied["ingress"]["reason"] == "default-deny (endpoint selected by default/rule1 for ingress)"
    status, err = request("POST", url, {"from": {"endpoint": "default/nope"}, "to": star, "port": 80}, token)
    assert status == 400 and "not known" in err["error"]


async def test_the_service_becomes_ready_again_after_nats_restarts(
    policy_service: ServerProcess, nats_server: ServerProcess, creds: tuple[auth.Credentials, Path]
) -> None:
    token = creds[0].tokens["admin"]

    def ready() -> int:
        try:
            with urllib.request.urlopen(f"{policy_service.url}/readyz", timeout=2) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return err.code

    await nats_server.astop()
    try:

        async def not_ready() -> bool:
            return await asyncio.to_thread(ready) == 503

        await eventually(not_ready, what="/readyz to report 503 with NATS down")
    finally:
        await nats_server.astart()

    async def ready_again() -> bool:
        return await asyncio.to_thread(ready) == 200

    await eventually(ready_again, timeout=20, what="/readyz to report 200 after NATS returned")
    status, body = await asyncio.to_thread(
        request, "POST", f"{policy_service.url}/v1/policies", starwars_step(1), token
    )
    assert status == 200, body
