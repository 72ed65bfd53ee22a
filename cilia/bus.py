"""The bus: every NATS subject, stream and KV bucket cilia uses, and typed request/publish helpers.

This module is the only place a subject string is written (ARCHITECTURE.md §3). Payloads are
pydantic models serialised as JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NATSTimeoutError
from pydantic import BaseModel, ValidationError

from cilia.errors import CiliaError

log = logging.getLogger("cilia.bus")

# --- subjects -----------------------------------------------------------------------------------
IDENTITY_ALLOCATE = "cilia.identity.allocate"
IDENTITY_RELEASE = "cilia.identity.release"
IDENTITY_GET = "cilia.identity.get"
IDENTITY_EVENTS = "cilia.identity.events"
POLICY_REVISION = "cilia.policy.revision"
POLICY_TRACE = "cilia.policy.trace"
FLOWS_PREFIX = "cilia.flows"


def flows_subject(node: str) -> str:
    """Flows of one node: `cilia.flows.<node>`."""
    return f"{FLOWS_PREFIX}.{node}"


# --- JetStream ----------------------------------------------------------------------------------
FLOWS_STREAM = "CILIA_FLOWS"
IDENTITY_EVENTS_STREAM = "CILIA_IDENTITY_EVENTS"

# --- kvstore buckets (the first segment of every kvstore key) ---------------------------------
BUCKET_IDENTITIES = "identities"
BUCKET_POLICIES = "policies"
BUCKET_ENDPOINTS = "endpoints"
BUCKET_IPCACHE = "ipcache"
BUCKET_SERVICES = "services"
BUCKET_LBIPAM = "lbipam"
BUCKET_NODES = "nodes"
# Leader leases of node agents (L2 announcements: `leases/l2announce/<ns>/<name>`): agents write them.
BUCKET_LEASES = "leases"
BUCKETS = (
    BUCKET_IDENTITIES,
    BUCKET_POLICIES,
    BUCKET_ENDPOINTS,
    BUCKET_IPCACHE,
    BUCKET_SERVICES,
    BUCKET_LBIPAM,
    BUCKET_NODES,
    BUCKET_LEASES,
)

M = TypeVar("M", bound=BaseModel)


ERROR_LOG_INTERVAL = 30.0


class BusError(CiliaError):
    """A request over NATS failed: nobody answered, it timed out, or the answer was an error."""


class ErrorReply(BaseModel):
    error: str
    field: str | None = None


class _ErrorLog:
    def __init__(self) -> None:
        self.count = 0
        self.last = -ERROR_LOG_INTERVAL
        self.text = ""


async def connect(
    url: str,
    name: str,
    user: str | None = None,
    password: str | None = None,
    **opts: Any,
) -> NATS:
    """Connect to NATS, reconnecting forever in the background after an outage."""

    # The client retries every 0.5 s while NATS is away (also before the first connection): say so
    # once, then at most every ERROR_LOG_INTERVAL with a count, not twice a second for the outage.
    errors = _ErrorLog()

    async def _disconnected() -> None:
        log.warning("event=nats-disconnected url=%s", url)

    async def _reconnected() -> None:
        if errors.count:
            log.info("event=nats-errors-while-away count=%d last=%s", errors.count, errors.text)
        errors.count, errors.last = 0, -ERROR_LOG_INTERVAL
        log.info("event=nats-reconnected url=%s", url)

    async def _error(err: Exception) -> None:
        now = time.monotonic()
        errors.count += 1
        errors.text = str(err)
        if now - errors.last >= ERROR_LOG_INTERVAL:
            log.warning(
                "event=nats-error url=%s error=%s repeated=%d (retrying every 0.5 s; logged every %.0f s)",
                url,
                err,
                errors.count,
                ERROR_LOG_INTERVAL,
            )
            errors.count, errors.last = 0, now

    return await nats.connect(
        url,
        name=name,
        user=user,
        password=password,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=2,
        allow_reconnect=True,
        disconnected_cb=_disconnected,
        reconnected_cb=_reconnected,
        error_cb=_error,
        **opts,
    )


def encode(model: BaseModel) -> bytes:
    return model.model_dump_json().encode()


def decode(data: bytes, model: type[M]) -> M:
    return model.model_validate_json(data)


async def request(nc: NATS, subject: str, payload: BaseModel, reply: type[M], timeout: float = 2.0) -> M:
    """Request/reply with typed payloads; an `{"error": ...}` answer raises BusError with its text."""
    try:
        msg = await nc.request(subject, encode(payload), timeout=timeout)
    except NoRespondersError:
        raise BusError(f"nobody answers on {subject}: is the service running?") from None
    except NATSTimeoutError:
        raise BusError(f"no answer on {subject} within {timeout}s") from None
    data = json.loads(msg.data or b"{}")
    if isinstance(data, dict) and "error" in data and len(data) <= 2:
        raise BusError(str(data["error"]))
    try:
        return reply.model_validate(data)
    except ValidationError as err:
        raise BusError(f"malformed answer on {subject}: {err.errors()[0].get('msg')}") from None


async def publish(nc: NATS, subject: str, payload: BaseModel) -> None:
    await nc.publish(subject, encode(payload))


async def serve(
    nc: NATS,
    subject: str,
    model: type[M],
    handler: Callable[[M], Awaitable[BaseModel]],
    queue: str = "",
    concurrent: bool = False,
) -> Subscription:
    """Answer requests on `subject` with `handler`; bad input and failures are answered as errors.

    With `concurrent`, each request is handled in its own task (nats-py otherwise runs a
    subscription's callbacks one after another).
    """
    pending: set[asyncio.Task[None]] = set()

    async def _cb(msg: Msg) -> None:
        if concurrent:
            task = asyncio.create_task(_handle(msg))
            pending.add(task)
            task.add_done_callback(pending.discard)
        else:
            await _handle(msg)

    async def _handle(msg: Msg) -> None:
        try:
            payload = model.model_validate_json(msg.data)
        except ValidationError as err:
            e = err.errors()[0]
            answer: BaseModel = ErrorReply(
                error=f"invalid request: {e.get('msg')}", field=".".join(map(str, e.get("loc", ())))
            )
        else:
            try:
                answer = await handler(payload)
            except CiliaError as err:
                answer = ErrorReply(error=str(err))
            except Exception as err:  # keep serving; the caller gets one line
                log.exception("event=handler-failed subject=%s", subject)
                answer = ErrorReply(error=f"internal error: {type(err).__name__}: {err}")
        if msg.reply:
            await msg.respond(encode(answer))

    return await nc.subscribe(subject, queue=queue, cb=_cb)
