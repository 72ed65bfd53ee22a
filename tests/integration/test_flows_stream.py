"""Flows through a real nats-server: agents publish them to the flow stream, `cilia observe` (the real
command, as a process) reads, filters and prints them like `hubble observe`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from conftest import VENV_BIN, ServerProcess, find_binary, free_port, nats_ready
from deadline import eventually
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from cilia import auth, bus, flowstream
from cilia.flows import Flow, flow_to_dict, format_line
from services.datapath import eventtypes as ev
from services.datapath.eventtypes import RawEvent
from services.datapath.flowbuild import EndpointInfo, StaticFlowContext, build_flow

CILIA = str(VENV_BIN / "cilia")
K8S = "k8s:io.kubernetes.pod.namespace="
DEATHSTAR = EndpointInfo(
    "default", "deathstar-1", 6822, ("k8s:class=deathstar", K8S + "default"), "10.0.1.10", 1717
)
COREDNS = EndpointInfo(
    "kube-system", "coredns-1", 17513, ("k8s:k8s-app=kube-dns", K8S + "kube-system"), "10.0.1.53", 99
)


def pod(name: str, identity: int = 63406, namespace: str = "default") -> EndpointInfo:
    return EndpointInfo(
        namespace, name, identity, (f"k8s:app={name}", K8S + namespace), f"10.0.2.{identity % 250}", 0
    )


def flow(
    src: EndpointInfo,
    dst: EndpointInfo = DEATHSTAR,
    *,
    node: str = "node-a",
    event: int = ev.EVENT_TRACE,
    subtype: int = ev.TRACE_TO_LXC,
    verdict: int = ev.VERDICT_FORWARDED,
    dport: int = 80,
    ago_s: float = 0.0,
) -> Flow:
    """A flow built by the datapath's own builder from a datapath event."""
    ctx = StaticFlowContext(node_name=node, boot_offset_ns=time.time_ns(), endpoints=(src, dst))
    raw = RawEvent(
        ts_ns=-int(ago_s * 1e9),
        type=event,
        subtype=subtype,
        direction=ev.DIR_INGRESS,
        verdict=verdict,
        proto=6,
        tcp_flags=ev.TCP_SYN,
        match_type=0,
        is_reply=2 if verdict == ev.VERDICT_DROPPED else 0,
        ifindex=0,
        src_ep=src.id,
        dst_ep=dst.id,
        src_identity=src.identity,
        dst_identity=dst.identity,
        saddr=src.ip,
        daddr=dst.ip,
        sport=40000,
        dport=dport,
        cookie=0,
        proxy_port=0,
        pkt_len=60,
    )
    return build_flow(raw, ctx)


def dropped(src: EndpointInfo, **kw: Any) -> Flow:
    return flow(src, event=ev.EVENT_DROP, subtype=ev.DROP_POLICY, verdict=ev.VERDICT_DROPPED, **kw)


def observe(url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CILIA, "observe", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CILIA_NATS_URL": url, "CILIA_TOKEN_FILE": "", **(env or {})},
    )


async def aobserve(
    url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(observe, url, *args, env=env)


@pytest.fixture
async def nc(nats_server: ServerProcess) -> AsyncIterator[NATS]:
    nats_server.start()  # another test may have stopped the shared server
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


@pytest.fixture
async def js(nc: NATS) -> JetStreamContext:
    """JetStream with an empty flow stream."""
    ctx = nc.jetstream()
    await flowstream.ensure_flow_stream(ctx)
    await ctx.purge_stream(bus.FLOWS_STREAM)
    return ctx


async def publish(js: JetStreamContext, flows: list[Flow]) -> None:
    for f in flows:
        await flowstream.publish_flow(js, f.node_name, f)


# --- history -----------------------------------------------------------------------------------


async def test_last_prints_the_newest_flows_oldest_first(
    js: JetStreamContext, nats_server: ServerProcess
) -> None:
    flows = [flow(pod(f"xwing-{i}", 1000 + i)) for i in range(8)]
    await publish(js, flows)
    out = await aobserve(nats_server.url, "--last", "5")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [format_line(f) for f in flows[3:]]


async def test_without_last_or_follow_prints_the_last_20(
    js: JetStreamContext, nats_server: ServerProcess
) -> None:
    flows = [flow(pod(f"xwing-{i}", 1000 + i)) for i in range(25)]
    await publish(js, flows)
    out = await aobserve(nats_server.url)
    assert out.stdout.splitlines() == [format_line(f) for f in flows[5:]]


async def test_filters_pick_the_last_matching_flows_even_far_back(
    js: JetStreamContext, nc: NATS, nats_server: ServerProcess
) -> None:
    drops = [dropped(pod(f"xwing-{i}", 1000 + i)) for i in range(3)]
    await publish(js, drops)
    # many newer flows that do not match: the reader must look back past several windows
    noise = flow(pod("tiefighter", 25698))
    for _ in range(1500):
        await flowstream.publish_flow(nc, "node-a", noise)  # fire-and-forget, as agents at high rates
    await nc.flush()

    async def stored() -> bool:
        _first, last = await flowstream.stream_state(js)
        return last - _first + 1 == 1503

    await eventually(stored, what="1503 flows stored")
    out = await aobserve(nats_server.url, "--last", "2", "--verdict", "DROPPED")
    assert out.stdout.splitlines() == [format_line(f) for f in drops[1:]]
    assert out.stdout.count("Policy denied DROPPED") == 2


async def test_pod_namespace_node_and_type_filters(js: JetStreamContext, nats_server: ServerProcess) -> None:
    xwing, tie = pod("xwing", 63406), pod("tiefighter", 25698)
    a = flow(xwing)
    b = dropped(tie, node="node-b")
    c = flow(xwing, COREDNS, dport=53)
    d = flow(DEATHSTAR, xwing, node="node-b")
    await publish(js, [a, b, c, d])

    async def lines(*args: str) -> list[str]:
        out = await aobserve(nats_server.url, *args)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    assert await lines("--pod", "xwing") == [format_line(f) for f in (a, c, d)]
    assert await lines("--from-pod", "default/xwing") == [format_line(f) for f in (a, c)]
    assert await lines("--to-pod", "xwing") == [format_line(d)]
    assert await lines("-n", "kube-system") == [format_line(c)]
    assert await lines("--node-name", "node-b") == [format_line(f) for f in (b, d)]
    assert await lines("--type", "drop") == [format_line(b)]
    assert await lines("--to-identity", "17513") == [format_line(c)]
    assert await lines("--to-port", "53", "--print-node-name") == [format_line(c, node_name=True)]


async def test_json_output_is_one_hubble_envelope_per_line(
    js: JetStreamContext, nats_server: ServerProcess
) -> None:
    flows = [flow(pod("xwing")), dropped(pod("tiefighter", 25698), node="node-b")]
    await publish(js, flows)
    out = await aobserve(nats_server.url, "--last", "5", "-o", "json")
    assert out.returncode == 0, out.stderr
    docs = [json.loads(line) for line in out.stdout.splitlines()]
    assert [list(d) for d in docs] == [["flow", "node_name", "time"]] * 2
    assert [d["flow"] for d in docs] == [flow_to_dict(f) for f in flows]
    assert [d["node_name"] for d in docs] == ["node-a", "node-b"]
    assert docs[1]["flow"]["drop_reason_desc"] == "POLICY_DENIED"


async def test_dict_output(js: JetStreamContext, nats_server: ServerProcess) -> None:
    await publish(js, [flow(pod("xwing")), flow(pod("xwing"))])
    out = await aobserve(nats_server.url, "-o", "dict")
    blocks = out.stdout.split("------------\n")
    assert len(blocks) == 2
    assert blocks[0].splitlines()[1:] == [
        "     SOURCE: default/xwing:40000",
        "DESTINATION: default/deathstar-1:80",
        "       TYPE: to-endpoint",
        "    VERDICT: FORWARDED",
        "    SUMMARY: TCP Flags: SYN",
    ]


async def test_since_keeps_only_recent_flows(js: JetStreamContext, nats_server: ServerProcess) -> None:
    old = [flow(pod("old-xwing"), ago_s=7200), flow(pod("old-xwing"), ago_s=7100)]
    new = [flow(pod("new-xwing")), flow(pod("new-xwing"))]
    await publish(js, [*old, *new])
    recent = await aobserve(nats_server.url, "--since", "1h")
    assert recent.stdout.splitlines() == [format_line(f) for f in new]
    everything = await aobserve(nats_server.url, "--since", "3h")
    assert everything.stdout.splitlines() == [format_line(f) for f in (*old, *new)]
    nothing = await aobserve(
        nats_server.url, "--since", "2026-01-01T00:00:00Z", "--until", "2026-01-01T00:00:01Z"
    )
    assert nothing.returncode == 0 and nothing.stdout == ""


# --- follow ------------------------------------------------------------------------------------


class Observer:
    """`cilia observe` running in the background; read its lines one at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self, timeout: float = 15.0) -> str:
        assert self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(f"no line from cilia observe within {timeout} s") from None
        assert raw, f"cilia observe exited: {await self.stderr()}"
        return raw.decode().rstrip("\n")

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode()


async def start_observer(url: str, *args: str) -> Observer:
    proc = await asyncio.create_subprocess_exec(
        CILIA,
        "observe",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CILIA_NATS_URL": url, "CILIA_TOKEN_FILE": ""},
    )
    return Observer(proc)


async def stop(observer: Observer) -> None:
    if observer.proc.returncode is None:
        observer.proc.terminate()
    await observer.proc.wait()


async def test_follow_prints_the_last_flows_then_new_ones(
    js: JetStreamContext, nats_server: ServerProcess
) -> None:
    old = [flow(pod(f"old-{i}", 1000 + i)) for i in range(4)]
    await publish(js, old)
    observer = await start_observer(nats_server.url, "--last", "2", "--follow")
    try:
        assert [await observer.line(), await observer.line()] == [format_line(f) for f in old[2:]]
        new = [flow(pod(f"new-{i}", 2000 + i)) for i in range(3)]
        await publish(js, new)
        assert [await observer.line() for _ in new] == [format_line(f) for f in new]
    finally:
        await stop(observer)


async def test_follow_alone_prints_only_new_flows_that_match(
    js: JetStreamContext, nats_server: ServerProcess
) -> None:
    await publish(js, [dropped(pod("old-xwing"))])
    observer = await start_observer(nats_server.url, "-f", "--verdict", "DROPPED")
    try:
        # The observer subscribes at some point after starting: publish until it shows something.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        first: str | None = None
        while first is None:
            assert loop.time() < deadline, "cilia observe -f printed nothing"
            await publish(js, [flow(pod("new-xwing")), dropped(pod("new-xwing"))])
            try:
                first = await observer.line(timeout=0.2)
            except AssertionError:
                continue
        assert "default/new-xwing:40000" in first and "Policy denied DROPPED" in first
        last = dropped(pod("last-xwing", 3000))
        await publish(js, [flow(pod("new-xwing")), last])
        while (line := await observer.line()) != format_line(last):
            assert "new-xwing" in line and "DROPPED" in line
    finally:
        await stop(observer)


# --- errors ------------------------------------------------------------------------------------


async def test_no_stream_yet_says_so(nc: NATS, nats_server: ServerProcess) -> None:
    js = nc.jetstream()
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_stream(bus.FLOWS_STREAM)
    out = await aobserve(nats_server.url, "--last", "5")
    assert out.returncode == 1
    assert out.stderr == "error: no flows yet: is a datapath agent running?\n"
    await flowstream.ensure_flow_stream(js)


async def test_unreachable_nats_is_one_line() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    out = await aobserve(url, "--last", "5", "--pod", "deathstar")
    assert out.returncode == 1 and out.stdout == ""
    assert (
        out.stderr == f"error: cannot reach NATS at {url} (is it running? set CILIA_NATS_URL or --nats-url)\n"
    )


# --- with credentials: the agent role publishes, the reader role observes ------------------------


@pytest.fixture(scope="module")
def secured(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, auth.Credentials, Path]]:
    """A nats-server whose only users are the generated per-role ones."""
    d = tmp_path_factory.mktemp("flows-secured")
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


async def connect_as(server: ServerProcess, creds: auth.Credentials, role: str) -> NATS:
    user, password = creds.nats_users[role]
    return await nats.connect(server.url, user=user, password=password, allow_reconnect=False)


async def test_reader_role_observes_what_the_agent_role_published(
    secured: tuple[ServerProcess, auth.Credentials, Path],
) -> None:
    server, creds, creds_file = secured
    service = await connect_as(server, creds, "service")
    agent = await connect_as(server, creds, "agent")
    try:
        await flowstream.ensure_flow_stream(service.jetstream())
        js = agent.jetstream()
        await flowstream.ensure_flow_stream(js)  # exists: the agent may look it up
        flows = [flow(pod(f"xwing-{i}", 1000 + i), node="node-a") for i in range(3)]
        await publish(js, flows)
        env = {"CILIA_TOKEN_FILE": str(creds_file)}
        out = await aobserve(server.url, "--last", "5", env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [format_line(f) for f in flows]
        filtered = await aobserve(server.url, "--last", "5", "--from-identity", "1001", "-o", "json", env=env)
        assert [json.loads(line)["flow"] for line in filtered.stdout.splitlines()] == [flow_to_dict(flows[1])]
    finally:
        await service.close()
        await agent.close()


async def test_wrong_credentials_are_one_line(
    secured: tuple[ServerProcess, auth.Credentials, Path], tmp_path: Path
) -> None:
    server, _creds, _file = secured
    other = auth.write(auth.generate(), tmp_path / "other.yaml")
    out = await aobserve(server.url, "--last", "1", env={"CILIA_TOKEN_FILE": str(other)})
    assert out.returncode == 1
    assert out.stderr.startswith(f"error: NATS at {server.url} refused the credentials")
    assert out.stderr.count("\n") == 1
