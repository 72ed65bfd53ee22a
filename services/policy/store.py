"""The policy repository in the kvstore: one key per policy, a revision that grows with every change.

Keys (bucket `policies`):
  items/<kind>/<namespace or _>/<name>  -> {"manifest": {...}, "revision": n}
  revision                              -> {"revision": n}

A batch is validated whole before anything is written, so a rejected batch leaves the repository
exactly as it was. The revision is bumped with compare-and-set, so several replicas may apply at
once; every watcher of `policies/items/` sees the initial state, then each change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from cilia.kvstore import KeyExistsError, KVStore, RevisionMismatchError
from cilia.models.loader import POLICY_KINDS, load_documents, parse_documents
from cilia.policy.repository import PolicyKey, Repository, policy_key
from cilia.policy.translate import PolicyResource

PREFIX = "policies"


def item_key(key: PolicyKey, bucket: str = PREFIX) -> str:
    kind, ns, name = key
    return f"{bucket}/items/{kind}/{ns or '_'}/{name}"


def key_of(item: str) -> PolicyKey:
    _bucket, _items, kind, ns, name = item.split("/", 4)
    return (kind, "" if ns == "_" else ns, name)


@dataclass(frozen=True)
class Applied:
    key: PolicyKey
    action: str  # created, configured, unchanged, deleted


def manifest_of(obj: BaseModel) -> dict[str, Any]:
    return obj.model_dump(mode="json", by_alias=True, exclude_none=True)


class PolicyStore:
    """Apply, delete and read policies kept in the kvstore."""

    def __init__(self, kv: KVStore, bucket: str = PREFIX) -> None:
        self.kv = kv
        self.bucket = bucket
        self.revision_key = f"{bucket}/revision"
        self.items_prefix = f"{bucket}/items/"

    async def revision(self) -> int:
        entry = await self.kv.get(self.revision_key)
        return int(json.loads(entry.value)["revision"]) if entry is not None else 0

    async def _bump(self) -> int:
        for _ in range(100):
            entry = await self.kv.get(self.revision_key)
            if entry is None:
                try:
                    await self.kv.create(self.revision_key, json.dumps({"revision": 1}).encode())
                    return 1
                except KeyExistsError:
                    continue
            new = int(json.loads(entry.value)["revision"]) + 1
            try:
                await self.kv.update(
                    self.revision_key, json.dumps({"revision": new}).encode(), entry.revision
                )
                return new
            except RevisionMismatchError:
                continue
        raise RuntimeError("the policy revision did not settle after 100 attempts")

    async def apply_text(self, text: str, origin: str = "<request>") -> tuple[int, list[Applied]]:
        """Validate every document of `text` (nothing is written if any is invalid), then store them."""
        docs = load_documents(text, origin)
        objs = parse_documents(docs, kinds=POLICY_KINDS)
        return await self.apply(objs, docs)  # type: ignore[arg-type]

    async def apply(
        self, objs: Iterable[PolicyResource], manifests: list[Any] | None = None
    ) -> tuple[int, list[Applied]]:
        """Store validated policies; `manifests` are the documents as the user wrote them."""
        objs = list(objs)
        raw = manifests if manifests is not None else [manifest_of(o) for o in objs]
        changes: list[Applied] = []
        writes: list[tuple[str, dict[str, Any]]] = []
        for obj, manifest in zip(objs, raw, strict=True):
            key = policy_key(obj)
            old = await self.kv.get(item_key(key, self.bucket))
            if old is None:
                action = "created"
            elif json.loads(old.value)["manifest"] == manifest:
                action = "unchanged"
            else:
                action = "configured"
            changes.append(Applied(key, action))
            if action != "unchanged":
                writes.append((item_key(key, self.bucket), manifest))
        if not writes:
            return await self.revision(), changes
        revision = await self._bump()
        for k, manifest in writes:
            await self.kv.put(k, json.dumps({"manifest": manifest, "revision": revision}).encode())
        return revision, changes

    async def delete(self, key: PolicyKey) -> tuple[int, Applied | None]:
        entry = await self.kv.get(item_key(key, self.bucket))
        if entry is None:
            return await self.revision(), None
        revision = await self._bump()
        await self.kv.delete(item_key(key, self.bucket))
        return revision, Applied(key, "deleted")

    async def get(self, key: PolicyKey) -> dict[str, Any] | None:
        entry = await self.kv.get(item_key(key, self.bucket))
        return None if entry is None else dict(json.loads(entry.value))

    async def list(self) -> list[tuple[PolicyKey, dict[str, Any]]]:
        return [(key_of(e.key), json.loads(e.value)) for e in await self.kv.list(self.items_prefix)]

    async def repository(self) -> Repository:
        """The stored policies as an engine repository (for trace)."""
        repo = Repository()
        items = await self.list()
        repo.apply(parse_documents([doc["manifest"] for _, doc in items]))  # type: ignore[arg-type]
        return repo
