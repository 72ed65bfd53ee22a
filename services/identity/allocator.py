"""Identity allocation over the kvstore, safe under concurrent allocators on every backend.

Keys (bucket `identities`):
  labels/<hash>        -> {"id": n, "labels": [...]}   one per label set (hash of the sorted labels)
  id/<n>               -> {"labels": [...]}              one per number
  refs/<n>/<holder>    -> ""                              a holder (a node) uses n; under its lease

Allocating: read labels/<hash>; if absent, reserve a free number by creating id/<n>
(create-if-absent), then create labels/<hash> -> n. Whoever loses the labels/<hash> race rolls its
reservation back (deleting id/<n> at the revision it wrote) and takes the winner's number. A number
is never handed to two label sets because id/<n> is created only once; a label set never gets two
numbers because labels/<hash> is created only once. Garbage collection deletes an identity nobody
references for a grace period, each key only at the revision it read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

from cilia.errors import CiliaError
from cilia.identity import MAX_CLUSTER_IDENTITY, MIN_CLUSTER_IDENTITY, RESERVED
from cilia.kvstore import KeyExistsError, KVStore, Lease, RevisionMismatchError
from cilia.labelfilter import identity_labels
from cilia.labels import SOURCE_RESERVED, SOURCE_UNSPEC, LabelSet

log = logging.getLogger("cilia.identity")

PREFIX = "identities"


class AllocationError(CiliaError):
    """No number could be allocated (the range is exhausted or contention did not settle)."""


@dataclass(frozen=True)
class AllocatedIdentity:
    id: int
    labels: tuple[str, ...]
    created: bool = False  # this call allocated a new number


def normalize(labels: Iterable[str]) -> LabelSet:
    """Parse `source:key=value` strings and keep only the security-relevant labels."""
    return identity_labels(LabelSet.of(labels, default_source=SOURCE_UNSPEC))


def labels_hash(labels: LabelSet) -> str:
    return hashlib.sha256("\n".join(labels.sorted_strings()).encode()).hexdigest()[:40]


def reserved_number(labels: LabelSet) -> int | None:
    """Reserved identities are never stored: `reserved:host` alone is 1, and so on."""
    if len(labels) == 1:
        (only,) = tuple(labels)
        if only.source == SOURCE_RESERVED and only.key in RESERVED:
            return RESERVED[only.key]
    return None


class IdentityAllocator:
    """Allocates, looks up, references and garbage-collects identities in a kvstore."""

    def __init__(
        self,
        kv: KVStore,
        low: int = MIN_CLUSTER_IDENTITY,
        high: int = MAX_CLUSTER_IDENTITY,
        rng: random.Random | None = None,
        bucket: str = PREFIX,
    ) -> None:
        self.kv = kv
        self.prefix = bucket
        self.low = low
        self.high = high
        self.rng = rng or random.Random()
        self._unused_since: dict[int, float] = {}

    async def allocate(
        self, labels: Iterable[str], holder: str | None = None, lease: Lease | None = None
    ) -> AllocatedIdentity:
        """The number of this label set, allocating one if needed; `holder` records a reference."""
        lset = normalize(labels)
        strings = tuple(lset.sorted_strings())
        if not strings:
            raise AllocationError("no security-relevant labels: an identity needs at least one label")
        reserved = reserved_number(lset)
        if reserved is not None:
            return AllocatedIdentity(reserved, strings)
        h = labels_hash(lset)
        key = f"{self.prefix}/labels/{h}"
        created = False
        for _attempt in range(64):
            existing = await self.kv.get(key)
            if existing is not None:
                num = int(json.loads(existing.value)["id"])
                break
            num = await self._reserve_number(strings)
            try:
                await self.kv.create(key, json.dumps({"id": num, "labels": list(strings)}).encode())
                created = True
                break
            except KeyExistsError:
                await self._rollback(num)
        else:
            raise AllocationError(f"could not settle an identity for {list(strings)} after 64 attempts")
        if holder is not None:
            await self.kv.put(f"{self.prefix}/refs/{num}/{holder}", b"", lease=lease)
            # Garbage collection may have removed an unreferenced identity between our read and our
            # reference; once the reference exists it will not, so check once more and retry if so.
            again = await self.kv.get(key)
            if again is None or int(json.loads(again.value)["id"]) != num:
                await self.kv.delete(f"{self.prefix}/refs/{num}/{holder}")
                return await self.allocate(strings, holder, lease)
        return AllocatedIdentity(num, strings, created)

    async def _reserve_number(self, strings: tuple[str, ...]) -> int:
        value = json.dumps({"labels": list(strings)}).encode()
        span = self.high - self.low + 1
        for _ in range(32):
            num = self.rng.randint(self.low, self.high)
            try:
                await self.kv.create(f"{self.prefix}/id/{num}", value)
                return num
            except KeyExistsError:
                continue
        # Crowded: walk the range from a random start.
        start = self.rng.randint(0, span - 1)
        for i in range(span):
            num = self.low + (start + i) % span
            try:
                await self.kv.create(f"{self.prefix}/id/{num}", value)
                return num
            except KeyExistsError:
                continue
        raise AllocationError(f"identity range {self.low}-{self.high} is exhausted")

    async def _rollback(self, num: int) -> None:
        entry = await self.kv.get(f"{self.prefix}/id/{num}")
        if entry is not None:
            with contextlib.suppress(RevisionMismatchError):
                await self.kv.delete(entry.key, revision=entry.revision)

    async def get(self, num: int) -> AllocatedIdentity | None:
        for name, value in RESERVED.items():
            if value == num:
                return AllocatedIdentity(num, (f"{SOURCE_RESERVED}:{name}",))
        entry = await self.kv.get(f"{self.prefix}/id/{num}")
        if entry is None:
            return None
        labels = tuple(json.loads(entry.value)["labels"])
        # A number whose labels key points elsewhere is a reservation that lost a race: not an identity.
        owner = await self.kv.get(f"{self.prefix}/labels/{labels_hash(normalize(labels))}")
        if owner is None or int(json.loads(owner.value)["id"]) != num:
            return None
        return AllocatedIdentity(num, labels)

    async def lookup(self, labels: Iterable[str]) -> AllocatedIdentity | None:
        lset = normalize(labels)
        reserved = reserved_number(lset)
        if reserved is not None:
            return AllocatedIdentity(reserved, tuple(lset.sorted_strings()))
        entry = await self.kv.get(f"{self.prefix}/labels/{labels_hash(lset)}")
        if entry is None:
            return None
        doc = json.loads(entry.value)
        return AllocatedIdentity(int(doc["id"]), tuple(doc["labels"]))

    async def list(self) -> list[AllocatedIdentity]:
        out = []
        for entry in await self.kv.list(f"{self.prefix}/labels/"):
            doc = json.loads(entry.value)
            out.append(AllocatedIdentity(int(doc["id"]), tuple(doc["labels"])))
        return sorted(out, key=lambda a: a.id)

    async def release(self, num: int, holder: str) -> bool:
        """Drop `holder`'s reference; the identity itself goes only in garbage collection."""
        return await self.kv.delete(f"{self.prefix}/refs/{num}/{holder}")

    async def references(self) -> dict[int, set[str]]:
        refs: dict[int, set[str]] = {}
        for entry in await self.kv.list(f"{self.prefix}/refs/"):
            _, _, num, holder = entry.key.split("/", 3)
            refs.setdefault(int(num), set()).add(holder)
        return refs

    async def gc(self, grace_seconds: float, now: float | None = None) -> list[int]:
        """Delete identities unreferenced for `grace_seconds`, and orphaned number reservations."""
        now = time.time() if now is None else now
        refs = await self.references()
        labels_entries = await self.kv.list(f"{self.prefix}/labels/")
        owners = {int(json.loads(e.value)["id"]): e for e in labels_entries}
        removed = []
        for num, entry in owners.items():
            if num in refs:
                self._unused_since.pop(num, None)
                continue
            since = self._unused_since.setdefault(num, now)
            if now - since < grace_seconds:
                continue
            try:
                await self.kv.delete(entry.key, revision=entry.revision)
            except RevisionMismatchError:
                continue
            id_entry = await self.kv.get(f"{self.prefix}/id/{num}")
            if id_entry is not None:
                with contextlib.suppress(RevisionMismatchError):
                    await self.kv.delete(id_entry.key, revision=id_entry.revision)
            self._unused_since.pop(num, None)
            removed.append(num)
        # Reservations (id/<n>) whose labels key never appeared: a crashed allocator's leftovers.
        for entry in await self.kv.list(f"{self.prefix}/id/"):
            num = int(entry.key.rsplit("/", 1)[1])
            if num in owners:
                continue
            key = ("orphan", num)
            since = self._unused_since.setdefault(hash(key), now)
            if now - since < grace_seconds:
                continue
            try:
                await self.kv.delete(entry.key, revision=entry.revision)
                self._unused_since.pop(hash(key), None)
            except RevisionMismatchError:
                pass
        return removed
