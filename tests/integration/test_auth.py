"""Authentication (ARCHITECTURE.md §10) with a real nats-server running generated per-role users:
HTTP writes need a token of the right role, and NATS users can use only their role's subjects."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from conftest import ServerProcess, find_binary, free_port, nats_ready

from cilia import auth, bus
from cilia.kvstore import KVError, connect
from services.identity.models import AllocateRequest, IdentityReply

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
"""


@pytest.fixture(scope="module")
def secured(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, auth.Credentials, Path]]:
    """A nats-server whose only users are the generated per-role ones."""
    d = tmp_path_factory.mktemp("secured")
    creds = auth.generate()
    creds_file = auth.write(creds, d / "credentials.yaml")
    port = free_port()
    conf = d / "nats.conf"
    conf.write_text(auth.nats_config(creds, "127.0.0.1", port, d / "js"))
    server = ServerProcess(
        "nats-secured",
        [find_binary("nats-server"), "-c", str(conf)],
        f"nats://127.0.0.1:{port}",
        nats_ready(port),
        d / "nats.log",
    )
    try:
        server.start()
        yield server, creds, creds_file
    finally:
        server.stop()


def post(url: str, body: str, token: str | None) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=body.encode(), method="POST", headers={"content-type": "application/yaml"}
    )
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def services(
    secured: tuple[ServerProcess, auth.Credentials, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServerProcess]]:
    import os

    from conftest import REPO, VENV_BIN, http_ready

    server, _creds, creds_file = secured
    started = {}
    try:
        for name in ("identity", "policy"):
            port = free_port()
            env = {
                **os.environ,
                "PYTHONPATH": str(REPO),
                "CILIA_HTTP_ADDR": f"127.0.0.1:{port}",
                "CILIA_NATS_URL": server.url,
                "CILIA_TOKEN_FILE": str(creds_file),
            }
            proc = ServerProcess(
                name,
                [str(VENV_BIN / "python"), "-m", f"services.{name}"],
                f"http://127.0.0.1:{port}",
                http_ready(port),
                tmp_path_factory.mktemp(name) / "log",
                env,
            )
            proc.start()
            started[name] = proc
        yield started
    finally:
        for proc in started.values():
            proc.stop()


def test_services_run_with_their_own_nats_user(services: dict[str, ServerProcess]) -> None:
    for proc in services.values():
        with urllib.request.urlopen(f"{proc.url}/readyz", timeout=5) as resp:
            assert json.loads(resp.read())["ready"] is True


def test_a_write_without_a_token_is_refused(services: dict[str, ServerProcess]) -> None:
    status, body = post(f"{services['policy'].url}/v1/policies", POLICY, None)
    assert status == 401
    assert "bearer token" in body["error"]


def test_a_write_with_a_token_of_the_wrong_role_is_forbidden(
    services: dict[str, ServerProcess], secured: tuple[ServerProcess, auth.Credentials, Path]
) -> None:
    creds = secured[1]
    status, body = post(f"{services['policy'].url}/v1/policies", POLICY, creds.tokens["agent"])
    assert status == 403
    assert "role agent" in body["error"]
    status, body = post(f"{services['policy'].url}/v1/policies", POLICY, "not-a-token")
    assert status == 401
    status, body = post(f"{services['policy'].url}/v1/policies", POLICY, creds.tokens["admin"])
    assert status == 200 and body["changes"][0]["action"] in ("created", "unchanged")


def test_reads_need_a_token_unless_anonymous_reads_are_on(
    services: dict[str, ServerProcess], secured: tuple[ServerProcess, auth.Credentials, Path]
) -> None:
    url = f"{services['policy'].url}/v1/policies"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=5)
    assert err.value.code == 401
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {secured[1].tokens['reader']}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


async def test_a_node_role_client_cannot_publish_a_policy(
    services: dict[str, ServerProcess], secured: tuple[ServerProcess, auth.Credentials, Path]
) -> None:
    server, creds, _ = secured
    user, password = creds.nats_users["agent"]
    agent_kv = await connect("nats", server.url, nats_user=user, nats_password=password, timeout=2.0)
    try:
        with pytest.raises(KVError):
            await agent_kv.put(
                "policies/items/CiliumNetworkPolicy/default/evil", b'{"manifest": {}, "revision": 1}'
            )
        # It may still read policies (agents enforce them) ...
        assert await agent_kv.get("policies/items/CiliumNetworkPolicy/default/evil") is None
    finally:
        await agent_kv.close()
    # ... and allocate identities over NATS.
    nc = await nats.connect(server.url, user=user, password=password)
    try:
        reply = await bus.request(
            nc, bus.IDENTITY_ALLOCATE, AllocateRequest(labels=["k8s:app=x"]), IdentityReply
        )
        assert reply.id >= 256
    finally:
        await nc.close()


async def test_unknown_nats_users_are_rejected(secured: tuple[ServerProcess, auth.Credentials, Path]) -> None:
    server = secured[0]
    with pytest.raises(Exception):  # noqa: B017 - nats-py raises its own authorization error types
        await asyncio.wait_for(
            nats.connect(
                server.url, user="mallory", password="x", max_reconnect_attempts=0, connect_timeout=2
            ),
            5,
        )
