"""Leader election for L2 announcements: one lease per service in the kvstore
(`leases/l2announce/<namespace>/<name>`, Cilium's `cilium-l2announce-<ns>-<name>` Lease), held by the
node that answers ARP for the service's addresses.

The protocol is Kubernetes' lease-based leader election, on compare-and-set: the holder rewrites the
lease every `retry_period`; a candidate that has seen the lease unchanged for `lease_duration` (by
its own clock: clocks of different hosts are never compared) takes it over with a compare-and-set at
the revision it saw, so only one candidate wins. A holder that could not renew for `renew_deadline`
(< lease_duration) stops answering before anyone else may start. A holder that stops on purpose,
or whose service is no longer selected for it, deletes the lease so another node takes over at once.
Failover after a holder dies takes lease_duration + retry_period at most (1.2 s by default; Cilium's
defaults of 15 s/5 s/2 s give 10-20 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cilia.kvstore import EventKind, KeyExistsError, KVStore, RevisionMismatchError
from services.lbipam.selection import L2Want

log = logging.getLogger("cilia.announcer.l2")


def now_rfc3339() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"


@dataclass
class Seen:
    """A lease as this node last saw it change: revision, holder, and when (monotonic clock)."""

    revision: int
    holder: str
    at: float
    transitions: int = 0


@dataclass
class Held:
    revision: int
    acquired: str
    transitions: int
    renewed: float  # monotonic time of the last successful write


class Elector:
    """Takes part in the election of every candidate service; `leading()` is what this node answers for."""

    def __init__(
        self,
        kv: KVStore,
        node: str,
        bucket: str,
        on_change: Callable[[], None],
        lease_duration: float = 1.0,
        renew_deadline: float = 0.8,
        retry_period: float = 0.2,
    ) -> None:
        self.kv = kv
        self.node = node
        self.prefix = f"{bucket}/l2announce/"
        self.on_change = on_change
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.candidates: dict[str, L2Want] = {}
        self.held: dict[str, Held] = {}
        self.seen: dict[str, Seen] = {}
        self._wake = asyncio.Event()
        self.transitions = 0  # leaderships taken by this node (a metric)

    def key(self, service: str) -> str:
        return self.prefix + service

    def set_candidates(self, wants: dict[str, L2Want]) -> None:
        self.candidates = dict(wants)
        self._wake.set()

    def leading(self) -> dict[str, L2Want]:
        """Candidates this node holds a live lease for."""
        now = time.monotonic()
        return {
            s: w
            for s, w in self.candidates.items()
            if s in self.held and now - self.held[s].renewed < self.renew_deadline
        }

    def _value(self, acquired: str, transitions: int) -> bytes:
        return json.dumps(
            {
                "holderIdentity": self.node,
                "leaseDurationSeconds": self.lease_duration,
                "acquireTime": acquired,
                "renewTime": now_rfc3339(),
                "leaseTransitions": transitions,
            }
        ).encode()

    async def watch(self) -> None:
        """Follow every lease: who holds it and when it last changed; a deleted lease is free now."""
        async with self.kv.watch(self.prefix) as events:
            async for ev in events:
                if ev.kind is EventKind.LIST_DONE:
                    continue
                service = ev.key[len(self.prefix) :]
                if ev.kind is EventKind.DELETE:
                    self.seen.pop(service, None)
                    if service in self.held:
                        self.held.pop(service)
                        self.on_change()
                    self._wake.set()
                    continue
                try:
                    doc = json.loads(ev.value)
                except ValueError:
                    continue
                old = self.seen.get(service)
                if old is None or old.revision != ev.revision:
                    self.seen[service] = Seen(
                        ev.revision,
                        str(doc.get("holderIdentity", "")),
                        time.monotonic(),
                        int(doc.get("leaseTransitions", 0)),
                    )

    async def run(self) -> None:
        """Renew what is held, release what is no longer wanted, contend for the rest, every retry period."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.retry_period)
            self._wake.clear()
            before = set(self.leading())
            for service in list(self.held):
                if service not in self.candidates:
                    await self._release(service)
            for service in list(self.candidates):
                try:
                    if service in self.held:
                        await self._renew(service)
                    else:
                        await self._contend(service)
                except Exception as err:  # the kvstore is away: keep trying; leases run out by themselves
                    log.debug("event=l2-lease-error service=%s error=%r", service, str(err))
            if set(self.leading()) != before:
                self.on_change()

    async def _renew(self, service: str) -> None:
        held = self.held[service]
        try:
            held.revision = await self.kv.update(
                self.key(service), self._value(held.acquired, held.transitions), held.revision
            )
            held.renewed = time.monotonic()
        except RevisionMismatchError:
            self.held.pop(service)
            log.info("event=l2-lease-lost service=%s node=%s", service, self.node)
        if service in self.held and time.monotonic() - held.renewed >= self.renew_deadline:
            self.held.pop(service)
            log.info("event=l2-lease-expired service=%s node=%s", service, self.node)

    async def _contend(self, service: str) -> None:
        key = self.key(service)
        seen = self.seen.get(service)
        now = time.monotonic()
        acquired = now_rfc3339()
        if seen is None:
            entry = await self.kv.get(key)
            if entry is not None:
                # Someone holds it (our watch has not told us yet): start its clock now.
                doc = json.loads(entry.value)
                self.seen[service] = Seen(
                    entry.revision,
                    str(doc.get("holderIdentity", "")),
                    now,
                    int(doc.get("leaseTransitions", 0)),
                )
                if doc.get("holderIdentity") != self.node:
                    return
                seen = self.seen[service]
            else:
                try:
                    revision = await self.kv.create(key, self._value(acquired, 0))
                except KeyExistsError:
                    return
                self._won(service, revision, acquired, 0)
                return
        # A lease this node held before a restart is its own to take back; others only once stale.
        if seen.holder != self.node and now - seen.at < self.lease_duration:
            return
        transitions = seen.transitions + (0 if seen.holder == self.node else 1)
        try:
            revision = await self.kv.update(key, self._value(acquired, transitions), seen.revision)
        except RevisionMismatchError:
            self.seen.pop(service, None)
            return
        self._won(service, revision, acquired, transitions)

    def _won(self, service: str, revision: int, acquired: str, transitions: int) -> None:
        self.held[service] = Held(revision, acquired, transitions, time.monotonic())
        self.seen[service] = Seen(revision, self.node, time.monotonic(), transitions)
        self.transitions += 1
        log.info("event=l2-lease-acquired service=%s node=%s transitions=%d", service, self.node, transitions)

    async def _release(self, service: str) -> None:
        held = self.held.pop(service, None)
        if held is None:
            return
        with contextlib.suppress(Exception):
            await self.kv.delete(self.key(service), revision=held.revision)
        log.info("event=l2-lease-released service=%s node=%s", service, self.node)

    async def release_all(self) -> None:
        for service in list(self.held):
            await self._release(service)
