"""The kvstore: one contract (get, put, create-if-absent, compare-and-set, delete, list, watch, leases)
over two backends, NATS JetStream KV (the default) and etcd.

    store = await connect(settings.kvstore, settings.nats_url)   # CILIA_KVSTORE, CILIA_NATS_URL
    async with store.watch("identities/") as events:
        async for event in events: ...
"""

from __future__ import annotations

from cilia.kvstore.address import DEFAULT_NATS_URL, Address, parse_address
from cilia.kvstore.base import LIST_DONE, Entry, EventKind, KVStore, Lease, Watch, WatchEvent
from cilia.kvstore.errors import (
    InvalidKeyError,
    KeyExistsError,
    KVError,
    KVUnavailableError,
    LeaseExpiredError,
    RevisionMismatchError,
)

__all__ = [
    "DEFAULT_NATS_URL",
    "LIST_DONE",
    "Address",
    "Entry",
    "EventKind",
    "InvalidKeyError",
    "KVError",
    "KVStore",
    "KVUnavailableError",
    "KeyExistsError",
    "Lease",
    "LeaseExpiredError",
    "RevisionMismatchError",
    "Watch",
    "WatchEvent",
    "connect",
    "parse_address",
]


async def connect(
    kvstore: str = "nats",
    nats_url: str = DEFAULT_NATS_URL,
    *,
    nats_user: str | None = None,
    nats_password: str | None = None,
    timeout: float = 5.0,
) -> KVStore:
    """Connect to the kvstore `kvstore` names: 'nats' (the server at `nats_url`), 'nats://…' or 'etcd://…'.

    `nats_user`/`nats_password` log in to NATS (unused for etcd). `timeout` bounds connecting and every
    later request; KVUnavailableError says what to check.
    """
    address = parse_address(kvstore, nats_url)
    if address.backend == "etcd":
        from cilia.kvstore.etcd import EtcdKVStore  # imports gRPC, which NATS users do not need

        return await EtcdKVStore.connect(address, timeout=timeout)
    from cilia.kvstore.natskv import NatsKVStore

    return await NatsKVStore.connect(address, user=nats_user, password=nats_password, timeout=timeout)
