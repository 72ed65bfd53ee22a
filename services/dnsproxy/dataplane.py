"""The data plane's thread: an event loop of its own, inside the node's network namespace.

The proxy's sockets (the transparent listeners and every upstream socket) must live in the node's
namespace, while its HTTP API stays where the process runs. setns(CLONE_NEWNET) moves only the
calling thread, so a dedicated thread enters the namespace once and runs the proxy's loop there;
every socket it creates is born in the node. The data plane starts before, and independently
of, the service's NATS connection: DNS never waits for the control plane.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from services.dnsproxy.metrics import Metrics
from services.dnsproxy.proxy import DNSProxy, ProxyConfig

log = logging.getLogger("cilia.dnsproxy")

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class DataPlaneError(RuntimeError):
    """The data plane could not start (namespace, sockets)."""


def enter_netns(netns: str) -> None:
    """Move the calling thread into a network namespace (a name under /run/netns, or a path)."""
    path = netns if netns.startswith("/") else f"/run/netns/{netns}"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise DataPlaneError(f"cannot open the node's network namespace {path}: {err.strerror}") from None
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise DataPlaneError(f"cannot enter {path}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


class DataPlane:
    """Runs a DNSProxy on its own thread; `call` runs a function on that loop (for the API)."""

    def __init__(self, cfg: ProxyConfig, metrics: Metrics, netns: str | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.netns = netns
        self.proxy: DNSProxy | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="dnsproxy-dataplane", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise DataPlaneError(f"the data plane did not start within {timeout}s")
        if self._error is not None:
            raise DataPlaneError(str(self._error)) from self._error

    def _run(self) -> None:
        try:
            if self.netns:
                enter_netns(self.netns)
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self.loop = loop
            self._stop = asyncio.Event()
            self.proxy = DNSProxy(self.cfg, self.metrics)
            loop.run_until_complete(self.proxy.start())
        except BaseException as err:
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_until_complete(self._stop.wait())
            loop.run_until_complete(self.proxy.stop())
        except Exception:
            log.exception("event=dataplane-stop-failed")
        finally:
            loop.close()

    async def call(self, fn: Callable[[DNSProxy], T]) -> T:
        """Run `fn(proxy)` on the data plane's loop (its state is only touched there)."""
        if self.loop is None or self.proxy is None:
            raise DataPlaneError("the data plane is not running")
        proxy = self.proxy
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(proxy))
            except BaseException as err:
                fut.set_exception(err)

        self.loop.call_soon_threadsafe(run)
        return await asyncio.wrap_future(fut)

    def stop(self, timeout: float = 10.0) -> None:
        if self.loop is not None and self._stop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
