"""The DNS proxy's side of the node-local API: registration, policy, FQDN updates and flows.

Several connections to the agent's unix socket, each for one kind of traffic so that a slow map
write never delays a verdict or a flow: `register` (registration plus the generation watch: the
redirect lives as long as this connection), `control` (dns_policy, fqdn_list, ips_in_use),
`fqdn` (allow_fqdn, forget_fqdn) and `flows`. Requests on a connection are pipelined (answers
come in order); a request that times out closes its connection, so a late answer can never be
taken for the next one. When the agent goes away the proxy keeps its last policies and goes on
answering; when it comes back the proxy registers again and resends its FQDN cache.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("cilia.dnsproxy.agent")

MAX_LINE = 1 << 24


class AgentUnavailable(ConnectionError):
    """The agent's socket is not there, closed the connection, or did not answer in time."""


class AgentConnection:
    """One connection; requests pipelined, answers matched in order."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: collections.deque[asyncio.Future[dict[str, Any]]] = collections.deque()
        self._reading: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def _connect(self) -> None:
        async with self._connecting:
            if self.connected:
                return
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    str(self.path), limit=MAX_LINE
                )
            except OSError as err:
                raise AgentUnavailable(f"cannot connect to {self.path}: {err.strerror or err}") from None
            self._reading = asyncio.create_task(self._read(self._reader), name=f"agent-{self.name}")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                if not self._pending:
                    continue
                fut = self._pending.popleft()
                if not fut.done():
                    try:
                        fut.set_result(json.loads(line))
                    except ValueError as err:
                        fut.set_exception(AgentUnavailable(f"bad answer from the agent: {err}"))
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            self._drop(AgentUnavailable("the agent closed the connection"))

    def _drop(self, err: Exception) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(err)

    async def request(self, payload: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
        if not self.connected:
            await self._connect()
        assert self._writer is not None
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        try:
            self._writer.write(json.dumps(payload, separators=(",", ":")).encode() + b"\n")
        except (OSError, RuntimeError) as err:
            self._drop(AgentUnavailable(str(err)))
            raise AgentUnavailable(str(err)) from None
        try:
            answer = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self._drop(AgentUnavailable(f"no answer to {payload.get('op')} within {timeout}s"))
            raise AgentUnavailable(f"no answer to {payload.get('op')} within {timeout}s") from None
        if not answer.get("ok"):
            raise AgentError(str(answer.get("error", "the agent refused the request")))
        return answer

    async def wait_closed(self) -> None:
        """Until the agent closes this connection."""
        if self._reading is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._reading)

    def close(self) -> None:
        self._drop(AgentUnavailable("closed"))
        if self._reading is not None:
            self._reading.cancel()


class AgentError(RuntimeError):
    """The agent answered with an error."""


class Registration:
    """The proxy's registration and the generation watch, on one long-lived connection."""

    def __init__(self, path: Path, port: int, on_generation: Callable[[int], None]) -> None:
        self.path = path
        self.port = port
        self.on_generation = on_generation
        self.registered = asyncio.Event()

    async def run_once(self) -> None:
        """Connect, register, then relay generations until the connection ends."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_LINE)
        except OSError as err:
            raise AgentUnavailable(f"cannot connect to {self.path}: {err.strerror or err}") from None
        try:
            for payload in (
                {"op": "register_proxy", "type": "dns", "port": self.port, "mode": "tproxy"},
                {"op": "watch"},
            ):
                writer.write(json.dumps(payload).encode() + b"\n")
                await writer.drain()
                answer = json.loads(await asyncio.wait_for(reader.readline(), 10.0) or b"null")
                if not isinstance(answer, dict) or not answer.get("ok"):
                    raise AgentError(f"{payload['op']}: {answer!r}")
            self.on_generation(int(answer["generation"]))
            self.registered.set()
            log.info("event=registered port=%d generation=%d", self.port, answer["generation"])
            while line := await reader.readline():
                self.on_generation(int(json.loads(line)["generation"]))
        except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError) as err:
            raise AgentUnavailable(f"registration connection: {err}") from None
        finally:
            self.registered.clear()
            writer.close()


Hook = Callable[[], Awaitable[None]]


class AgentLink:
    """Everything the data plane asks of the agent (see the module docstring)."""

    def __init__(self, path: Path, port: int) -> None:
        self.path = path
        self.port = port
        self.control = AgentConnection(path, "control")
        self.fqdn = AgentConnection(path, "fqdn")
        self.flows = AgentConnection(path, "flows")
        self.generation = -1
        self.generation_changed: list[Callable[[int], None]] = []
        self.on_connect: list[Hook] = []
        self.registration = Registration(path, port, self._generation)
        self.up = asyncio.Event()
        self.reconnects = 0

    def _generation(self, generation: int) -> None:
        if generation != self.generation:
            self.generation = generation
            for fn in self.generation_changed:
                fn(generation)

    async def run(self) -> None:
        """Stay registered: reconnect (quickly: the redirect fails closed meanwhile) and resync."""
        delay = 0.02
        while True:
            task = asyncio.create_task(self.registration.run_once())
            registered = asyncio.create_task(self.registration.registered.wait())
            await asyncio.wait({task, registered}, return_when=asyncio.FIRST_COMPLETED)
            registered.cancel()
            if self.registration.registered.is_set():
                self.up.set()
                delay = 0.02
                for hook in self.on_connect:
                    try:
                        await hook()
                    except (AgentUnavailable, AgentError) as err:
                        log.warning("event=resync-failed error=%r", str(err))
            try:
                await task
            except (AgentUnavailable, AgentError) as err:
                if self.up.is_set():
                    log.warning("event=agent-lost error=%r (answering with the last policies)", str(err))
                else:
                    log.debug("event=agent-unavailable error=%r", str(err))
            self.up.clear()
            self.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    def close(self) -> None:
        for c in (self.control, self.fqdn, self.flows):
            c.close()
