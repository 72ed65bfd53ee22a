"""Wiring of the policy service: the repository in the kvstore, HTTP routes, revision events."""

from __future__ import annotations

from cilia import bus
from cilia.service import Service
from cilia.settings import Settings
from services.policy.app import router
from services.policy.store import PolicyStore


class PolicySettings(Settings):
    service: str = "policy"
    policy_bucket: str = bus.BUCKET_POLICIES


def build(settings: PolicySettings | None = None) -> Service:
    settings = settings or PolicySettings()
    service = Service("policy", settings, "The policy repository: validate, store, distribute, trace.")
    holder: dict[str, PolicyStore] = {}
    service.app.include_router(router(service, lambda: holder.get("store")))

    @service.on_start
    async def start(svc: Service) -> None:
        assert svc.kv is not None
        store = PolicyStore(svc.kv, settings.policy_bucket)
        await store.revision()  # creates the bucket: agents may only read it, so they cannot
        holder["store"] = store

    return service


def main() -> None:
    build().run()
