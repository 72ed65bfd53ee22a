"""Integration fixtures: a real nats-server and a real etcd on free ports, and a connected kvstore per backend.

The servers start once per session and stop at its end, even when tests fail. A test may stop() and
start() one (same ports, same data dir) to exercise reconnects; the next test gets it running again.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from support.servers import (  # re-exported: tests import them from this conftest
    REPO,
    VENV_BIN,
    MissingBinary,
    ServerProcess,
    etcd_ready,
    free_port,
    http_ready,
    nats_ready,
)
from support.servers import find_binary as _find_binary

from cilia.kvstore import KVStore, connect

__all__ = [
    "REPO",
    "VENV_BIN",
    "ServerProcess",
    "etcd_ready",
    "find_binary",
    "free_port",
    "http_ready",
    "nats_ready",
]

STORE_TIMEOUT = 2.0  # kvstore request timeout in tests: short, so an unreachable server fails fast


def find_binary(name: str) -> str:
    try:
        return _find_binary(name)
    except MissingBinary as err:
        pytest.fail(str(err))


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """nats-server with JetStream on a free port; `.url` is its nats:// URL."""
    port = free_port()
    store = tmp_path_factory.mktemp("nats")
    argv = [find_binary("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)]
    server = ServerProcess(
        "nats-server", argv, f"nats://127.0.0.1:{port}", nats_ready(port), store / "server.log"
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A one-member etcd on free ports; `.url` is its etcd:// URL."""
    client, peer = free_port(), free_port()
    data = tmp_path_factory.mktemp("etcd")
    argv = [
        find_binary("etcd"),
        "--data-dir",
        str(data / "data"),
        "--listen-client-urls",
        f"http://127.0.0.1:{client}",
        "--advertise-client-urls",
        f"http://127.0.0.1:{client}",
        "--listen-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-cluster",
        f"default=http://127.0.0.1:{peer}",
    ]
    server = ServerProcess(
        "etcd", argv, f"etcd://127.0.0.1:{client}", etcd_ready(client), data / "server.log"
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["nats", "etcd"])
def kvserver(request: pytest.FixtureRequest) -> ServerProcess:
    """The server of each kvstore backend in turn, running (a test that stopped it may have failed)."""
    server: ServerProcess = request.getfixturevalue(f"{request.param}_server")
    server.start()
    return server


KVConnect = Callable[[], Awaitable[KVStore]]


@pytest.fixture
async def kvconnect(kvserver: ServerProcess) -> AsyncIterator[KVConnect]:
    """Opens more connections to the current backend's server; all are closed after the test."""
    stores: list[KVStore] = []

    async def open_store() -> KVStore:
        store = await connect(kvserver.url, timeout=STORE_TIMEOUT)
        stores.append(store)
        return store

    yield open_store
    for store in stores:
        await store.close()


@pytest.fixture
async def kvstore(kvconnect: KVConnect) -> KVStore:
    """A kvstore connected to each backend in turn (NATS JetStream KV, etcd)."""
    return await kvconnect()


@pytest.fixture
def bucket() -> str:
    """A bucket name no other test uses, so tests share servers without seeing each other's keys."""
    return f"t{uuid.uuid4().hex[:12]}"


# --- cilia's own services as processes -------------------------------------------------------

ServiceFactory = Callable[..., ServerProcess]


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[ServiceFactory]:
    """Starts `python -m services.<name>` with CILIA_* settings on a free port; all stop after the test.

    `start_service("identity", CILIA_NATS_URL=..., ...)` returns the process once /readyz answers
    200; `.url` is its http:// address. Pass `wait=False` to return once it is started.
    """
    started: list[ServerProcess] = []

    def start(name: str, wait: bool = True, **settings: str) -> ServerProcess:
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO), "CILIA_HTTP_ADDR": f"127.0.0.1:{port}", **settings}
        argv = [str(VENV_BIN / "python"), "-m", f"services.{name}"]
        ready = http_ready(port) if wait else http_ready(port, "/healthz")
        proc = ServerProcess(
            f"cilia-{name}", argv, f"http://127.0.0.1:{port}", ready, tmp_path / f"{name}-{port}.log", env
        )
        started.append(proc)
        proc.start()
        return proc

    try:
        yield start
    finally:
        for proc in reversed(started):
            proc.stop()
