"""The flow stream on NATS JetStream: agents publish flows, `cilia observe` reads them back.

One message on `cilia.flows.<node>` is one flow as Hubble's `-o json` envelope. The stream
(`bus.FLOWS_STREAM`) is bounded by count and age, like Hubble's ring buffer. Readers use ephemeral
ordered push consumers only, which the `reader` role may create.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NATSTimeoutError
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from cilia import bus
from cilia.errors import CiliaError
from cilia.flows import Flow, FlowError, FlowFilter, parse_json, to_json_line

log = logging.getLogger("cilia.flowstream")

MAX_FLOWS = 100_000
MAX_AGE_SECONDS = 3600.0
MAX_BYTES = 256 * 1024 * 1024
FLOW_SUBJECTS = f"{bus.FLOWS_PREFIX}.>"
IDLE_TIMEOUT = 5.0  # a history read that sees nothing for this long has reached the end


class FlowStreamError(CiliaError):
    """The flow stream is missing or cannot be read."""


class NoFlowsYet(FlowStreamError):
    def __init__(self) -> None:
        super().__init__("no flows yet: is a datapath agent running?")


def stream_config() -> api.StreamConfig:
    """The flow stream: every node's flows, newest 100k / last hour, oldest discarded first."""
    return api.StreamConfig(
        name=bus.FLOWS_STREAM,
        subjects=[FLOW_SUBJECTS],
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_msgs=MAX_FLOWS,
        max_age=MAX_AGE_SECONDS,
        max_bytes=MAX_BYTES,
        storage=api.StorageType.FILE,
        num_replicas=1,
    )


async def ensure_flow_stream(js: JetStreamContext) -> api.StreamInfo:
    """Create the flow stream if it does not exist yet (idempotent; agents call it at start)."""
    try:
        info: api.StreamInfo = await js.stream_info(bus.FLOWS_STREAM)
        return info
    except NotFoundError:
        pass
    try:
        created: api.StreamInfo = await js.add_stream(stream_config())
    except NATSTimeoutError:
        # NATS does not answer a request its permissions forbid: say which right is missing
        raise FlowStreamError(
            f"cannot create the flow stream {bus.FLOWS_STREAM}: no answer (may this NATS user "
            f"publish to $JS.API.STREAM.CREATE.{bus.FLOWS_STREAM}?)"
        ) from None
    log.info("event=flow-stream-created stream=%s max_msgs=%d", bus.FLOWS_STREAM, MAX_FLOWS)
    return created


async def publish_flow(js_or_nc: JetStreamContext | NATS, node: str, flow: Flow) -> None:
    """Publish one flow on `cilia.flows.<node>`.

    With a JetStream context the stream acknowledges it (and drops a duplicate of the same uuid);
    with a plain connection it is fire-and-forget, for high rates.
    """
    data = to_json_line(flow).encode()
    subject = bus.flows_subject(node)
    if isinstance(js_or_nc, JetStreamContext):
        headers = {"Nats-Msg-Id": flow.uuid} if flow.uuid else None
        await js_or_nc.publish(subject, data, stream=bus.FLOWS_STREAM, headers=headers)
    else:
        await js_or_nc.publish(subject, data)


async def stream_state(js: JetStreamContext) -> tuple[int, int]:
    """(first, last) sequence of the flow stream; NoFlowsYet if there is no stream."""
    try:
        info = await js.stream_info(bus.FLOWS_STREAM)
    except NotFoundError:
        raise NoFlowsYet() from None
    return int(info.state.first_seq or 0), int(info.state.last_seq or 0)


def _decode(data: bytes) -> Flow | None:
    try:
        return parse_json(data)
    except FlowError as err:
        log.warning("event=bad-flow error=%s", err)
        return None


async def _subscribe(
    js: JetStreamContext, *, start_seq: int | None = None, start_ns: int | None = None
) -> Any:
    """An ephemeral ordered push consumer on every node's flows (the reader role may create those)."""
    config = api.ConsumerConfig(inactive_threshold=30.0)
    if start_seq is not None:
        policy = api.DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = start_seq
    elif start_ns is not None:
        policy = api.DeliverPolicy.BY_START_TIME
        config.opt_start_time = datetime.fromtimestamp(start_ns / 1e9, UTC)
    else:
        policy = api.DeliverPolicy.NEW
    return await js.subscribe(
        FLOW_SUBJECTS, stream=bus.FLOWS_STREAM, ordered_consumer=True, deliver_policy=policy, config=config
    )


async def _read_range(
    js: JetStreamContext,
    flt: FlowFilter,
    last_seq: int,
    *,
    start_seq: int | None = None,
    start_ns: int | None = None,
    keep: int | None = None,
) -> list[Flow]:
    """The flows from a start up to stream sequence `last_seq` that pass `flt` (the newest `keep`)."""
    out: deque[Flow] = deque(maxlen=keep)
    sub = await _subscribe(js, start_seq=start_seq, start_ns=start_ns)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=IDLE_TIMEOUT)
            except TimeoutError:
                break  # nothing left to deliver (what was there expired meanwhile)
            seq = msg.metadata.sequence.stream
            if seq > last_seq:
                break
            flow = _decode(msg.data)
            if flow is not None and flt.matches(flow):
                out.append(flow)
            if seq == last_seq or msg.metadata.num_pending == 0:
                break
    finally:
        await _unsubscribe(sub)
    return list(out)


async def _unsubscribe(sub: Any) -> None:
    # the connection may be gone already; the server drops an unused consumer anyway
    with contextlib.suppress(Exception):
        await sub.unsubscribe()


async def _stored_at_ns(js: JetStreamContext, seq: int) -> int | None:
    """When the flow at stream sequence `seq` was stored, in ns since the epoch."""
    sub = await _subscribe(js, start_seq=seq)
    try:
        msg = await sub.next_msg(timeout=IDLE_TIMEOUT)
    except TimeoutError:
        return None
    finally:
        await _unsubscribe(sub)
    stamp: datetime = msg.metadata.timestamp
    return int(stamp.timestamp() * 1e9)


async def history(
    js: JetStreamContext, flt: FlowFilter, last: int | None, *, since_ns: int | None = None
) -> tuple[list[Flow], int]:
    """The newest `last` flows passing `flt` (every one if `last` is None), oldest first, stored
    since `since_ns` if given; and the stream sequence they were read up to (follow after it)."""
    first_seq, last_seq = await stream_state(js)
    if last_seq == 0 or last_seq < first_seq or last == 0:
        return [], last_seq
    if since_ns is not None:
        newest = await _stored_at_ns(js, last_seq)
        if newest is not None and newest < since_ns:
            return [], last_seq  # nothing that recent: do not wait for a consumer that has nothing
        return await _read_range(js, flt, last_seq, start_ns=since_ns, keep=last), last_seq
    if last is None:
        return await _read_range(js, flt, last_seq, start_seq=first_seq), last_seq
    # Hubble reads its ring buffer backwards until it has `last` matching flows; a stream reads
    # forwards only, so read ever larger windows, each ending where the previous one began.
    found: list[Flow] = []
    hi = last_seq
    window = max(4 * last, 256) if flt.selects_by_content else last
    while hi >= first_seq:
        lo = max(first_seq, hi - window + 1)
        found = [*await _read_range(js, flt, hi, start_seq=lo), *found]
        if len(found) >= last or lo == first_seq:
            break
        hi, window = lo - 1, window * 4
    return found[-last:], last_seq


async def follow(
    js: JetStreamContext, flt: FlowFilter, *, after_seq: int | None = None
) -> AsyncIterator[Flow]:
    """Flows as they arrive, after stream sequence `after_seq` (or from now on), forever."""
    sub = await _subscribe(js, start_seq=None if after_seq is None else after_seq + 1)
    try:
        while True:
            msg = await sub.next_msg(timeout=None)
            flow = _decode(msg.data)
            if flow is not None and flt.matches(flow):
                yield flow
    finally:
        await asyncio.shield(_unsubscribe(sub))
