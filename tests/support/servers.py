"""Test support shared by the integration and e2e suites: free ports, binaries, server processes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
POLL_INTERVAL = 0.05


class MissingBinary(RuntimeError):
    """A program the tests need is not installed."""


def find_binary(name: str) -> str:
    """The path of `name`, looked up in the project's venv first, then on PATH."""
    found = shutil.which(name, path=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    if found is None:
        raise MissingBinary(f"{name} is not installed (looked in {VENV_BIN} and PATH): run `make bootstrap`")
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


def http_ready(port: int, path: str = "/readyz") -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as response:
                return bool(response.status == 200)
        except (OSError, ValueError):
            return False

    return ready
