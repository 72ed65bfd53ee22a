"""Integration fixtures: a real nats-server and a real etcd on free ports, and a connected kvstore per backend.

The servers start once per session and stop at its end, even when tests fail. A test may stop() and
start() one (same ports, same data dir) to exercise reconnects; the next test gets it running again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from cilia.kvstore import KVStore, connect

VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"
POLL_INTERVAL = 0.05
STORE_TIMEOUT = 2.0  # kvstore request timeout in tests: short, so an unreachable server fails fast


def find_binary(name: str) -> str:
    """The path of `name`, looked up in the project's venv first, then on PATH."""
    found = shutil.which(name, path=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    if found is None:
        pytest.fail(f"{name} is not installed (looked in {VENV_BIN} and PATH): run `make bootstrap`")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """A server binary with fixed ports and data dir, which a test can stop() and start() again."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        url: str,
        ready: Callable[[], bool],
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.url = url
        self._ready = ready
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (if it is not running) and wait until it answers."""
        if self.running:
            return
        self._log = self._log_path.open("ab")
        self._proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self._proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} exited with {self._proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not answer within {timeout} s:\n{self.log_tail()}")
            time.sleep(POLL_INTERVAL)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no graceful shutdown."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after `timeout`); its data dir stays."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    async def astart(self) -> None:
        """`start()` without blocking the event loop (clients on it keep reconnecting meanwhile)."""
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        """`stop()` without blocking the event loop."""
        await asyncio.to_thread(self.stop)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])


def nats_ready(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                info = sock.recv(4096)
        except OSError:
            return False
        return info.startswith(b"INFO ") and b'"jetstream":true' in info

    return ready


def etcd_ready(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                return bool(json.load(response).get("health") == "true")
        except (OSError, ValueError):
            return False

    return ready


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

REPO = Path(__file__).resolve().parents[2]


def http_ready(port: int, path: str = "/readyz") -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as response:
                return bool(response.status == 200)
        except (OSError, ValueError):
            return False

    return ready


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
