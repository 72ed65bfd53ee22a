"""The kvstore contract, run unchanged against each backend (NATS JetStream KV and etcd) on a real server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import KVConnect, ServerProcess, find_binary, free_port, nats_ready
from deadline import eventually, next_item

from cilia.kvstore import (
    LIST_DONE,
    Entry,
    EventKind,
    InvalidKeyError,
    KeyExistsError,
    KVStore,
    KVUnavailableError,
    LeaseExpiredError,
    RevisionMismatchError,
    Watch,
    WatchEvent,
    connect,
)

LEASE_TTL = 2  # etcd raises shorter TTLs to its minimum of about 2 s


async def events_until(watch: Watch, done: WatchEvent, timeout: float = 15.0) -> list[WatchEvent]:
    """The watch's events up to and including `done`."""
    events: list[WatchEvent] = []
    while not events or events[-1] != done:
        events.append(await next_item(watch, timeout))
    return events


async def initial_state(watch: Watch) -> dict[str, bytes]:
    """Consume the watch's initial PUT events and its LIST_DONE marker."""
    state: dict[str, bytes] = {}
    for event in (await events_until(watch, LIST_DONE))[:-1]:
        assert event.kind is EventKind.PUT
        state[event.key] = event.value
    return state


async def test_get_returns_what_put_wrote_and_none_for_a_missing_key(kvstore: KVStore, bucket: str) -> None:
    key = f"{bucket}/labels/a1"
    assert await kvstore.get(key) is None

    first = await kvstore.put(key, b"one")
    entry = await kvstore.get(key)
    assert entry is not None
    assert (entry.key, entry.value, entry.revision) == (key, b"one", first)

    second = await kvstore.put(key, b"two")
    assert second > first
    assert await kvstore.get(key) == Entry(key, b"two", second)


async def test_create_refuses_a_key_that_exists_and_works_again_after_delete(
    kvstore: KVStore, bucket: str
) -> None:
    key = f"{bucket}/identities/1000"
    revision = await kvstore.create(key, b"first")

    with pytest.raises(KeyExistsError) as exc:
        await kvstore.create(key, b"second")
    assert exc.value.revision == revision
    assert key in str(exc.value)
    entry = await kvstore.get(key)
    assert entry is not None and entry.value == b"first"

    assert await kvstore.delete(key)
    again = await kvstore.create(key, b"third")
    assert again > revision
    entry = await kvstore.get(key)
    assert entry is not None and (entry.value, entry.revision) == (b"third", again)


async def test_update_writes_only_at_the_revision_it_read(kvstore: KVStore, bucket: str) -> None:
    key = f"{bucket}/policies/default/rule1"
    read = await kvstore.put(key, b"v1")

    written = await kvstore.update(key, b"v2", read)
    assert written > read

    with pytest.raises(RevisionMismatchError) as exc:
        await kvstore.update(key, b"stale", read)
    assert (exc.value.expected, exc.value.actual) == (read, written)
    entry = await kvstore.get(key)
    assert entry is not None and (entry.value, entry.revision) == (b"v2", written)

    with pytest.raises(RevisionMismatchError) as missing:
        await kvstore.update(f"{bucket}/policies/absent", b"x", written)
    assert missing.value.actual is None
    assert await kvstore.get(f"{bucket}/policies/absent") is None


async def test_delete_without_revision_reports_whether_the_key_existed(kvstore: KVStore, bucket: str) -> None:
    key = f"{bucket}/endpoints/node1/ep1"
    await kvstore.put(key, b"ep")

    assert await kvstore.delete(key) is True
    assert await kvstore.get(key) is None
    assert await kvstore.delete(key) is False


async def test_delete_with_revision_only_deletes_an_unchanged_key(kvstore: KVStore, bucket: str) -> None:
    key = f"{bucket}/endpoints/node1/ep2"
    old = await kvstore.put(key, b"a")
    new = await kvstore.put(key, b"b")

    with pytest.raises(RevisionMismatchError) as exc:
        await kvstore.delete(key, old)
    assert exc.value.actual == new
    assert await kvstore.get(key) is not None

    assert await kvstore.delete(key, new) is True
    assert await kvstore.get(key) is None
    with pytest.raises(RevisionMismatchError) as gone:
        await kvstore.delete(key, new)
    assert gone.value.actual is None


async def test_prepared_buckets_are_ready_and_preparing_again_changes_nothing(
    kvstore: KVStore, bucket: str
) -> None:
    await kvstore.prepare([bucket, f"{bucket}x"])
    await kvstore.prepare([bucket])
    assert await kvstore.list(f"{bucket}/") == []
    await kvstore.put(f"{bucket}/a", b"1")
    await kvstore.prepare([bucket])
    assert [e.key for e in await kvstore.list(f"{bucket}/")] == [f"{bucket}/a"]


async def test_list_returns_the_keys_under_a_prefix_and_no_others(kvstore: KVStore, bucket: str) -> None:
    keys = {
        f"{bucket}/a/1": b"a1",
        f"{bucket}/a/2/deep": b"a2",
        f"{bucket}/ab/1": b"ab1",
        f"{bucket}/b/1": b"b1",
        f"{bucket}/ipcache/10.0.1.10": b"ip",  # characters NATS subjects do not allow as such
        f"{bucket}/labels/k8s:app=web, tier=*>": b"labels",
        f"{bucket}x/a/1": b"other bucket",
    }
    for key, value in keys.items():
        await kvstore.put(key, value)

    def listed(entries: list[Entry]) -> list[tuple[str, bytes]]:
        return [(e.key, e.value) for e in entries]

    assert listed(await kvstore.list(f"{bucket}/a/")) == [
        (f"{bucket}/a/1", b"a1"),
        (f"{bucket}/a/2/deep", b"a2"),
    ]
    assert [k for k, _ in listed(await kvstore.list(f"{bucket}/a"))] == [
        f"{bucket}/a/1",
        f"{bucket}/a/2/deep",
        f"{bucket}/ab/1",
    ]
    assert listed(await kvstore.list(f"{bucket}/ipcache/10.0.1")) == [(f"{bucket}/ipcache/10.0.1.10", b"ip")]
    everything = sorted((k, v) for k, v in keys.items() if k.startswith(f"{bucket}/"))
    assert listed(await kvstore.list(bucket)) == everything
    assert listed(await kvstore.list(f"{bucket}/")) == everything
    assert listed(await kvstore.list(f"{bucket}/nothing/")) == []
    entry = await kvstore.get(f"{bucket}/labels/k8s:app=web, tier=*>")
    assert entry is not None and entry.value == b"labels"


async def test_malformed_keys_are_refused_the_same_way_by_every_backend(
    kvstore: KVStore, bucket: str
) -> None:
    for key in ("nobucket", f"{bucket}/", f"{bucket}//x", f"{bucket}/x/", "bad.bucket/x", "/x"):
        with pytest.raises(InvalidKeyError):
            await kvstore.put(key, b"v")
    for prefix in ("", "/x", f"{bucket}//"):
        with pytest.raises(InvalidKeyError):
            await kvstore.list(prefix)


async def test_watch_gives_the_initial_state_then_changes_then_deletes(kvstore: KVStore, bucket: str) -> None:
    prefix = f"{bucket}/nodes/"
    await kvstore.put(f"{prefix}n1", b"one")
    await kvstore.put(f"{prefix}n2", b"two")
    await kvstore.put(f"{bucket}/other/n9", b"outside")

    async with kvstore.watch(prefix) as watch:
        assert await initial_state(watch) == {f"{prefix}n1": b"one", f"{prefix}n2": b"two"}

        added = await kvstore.put(f"{prefix}n3", b"three")
        assert await next_item(watch) == WatchEvent(EventKind.PUT, f"{prefix}n3", b"three", added)

        entry = await kvstore.get(f"{prefix}n1")
        assert entry is not None
        changed = await kvstore.update(f"{prefix}n1", b"one again", entry.revision)
        assert await next_item(watch) == WatchEvent(EventKind.PUT, f"{prefix}n1", b"one again", changed)

        await kvstore.delete(f"{prefix}n2")
        deleted = await next_item(watch)
        assert (deleted.kind, deleted.key, deleted.value) == (EventKind.DELETE, f"{prefix}n2", b"")
        assert deleted.revision > changed

        await kvstore.put(f"{bucket}/other/n9", b"still outside")
        await kvstore.put(f"{bucket}/nodesX", b"outside too")
        last = await kvstore.put(f"{prefix}n4", b"four")
        assert await next_item(watch) == WatchEvent(EventKind.PUT, f"{prefix}n4", b"four", last)


async def test_watch_resumes_after_the_server_restarts(
    kvstore: KVStore, kvconnect: KVConnect, kvserver: ServerProcess, bucket: str
) -> None:
    prefix = f"{bucket}/ipcache/"
    await kvstore.put(f"{prefix}10.0.0.1", b"id-1")
    await kvstore.put(f"{prefix}10.0.0.2", b"id-2")

    async with kvstore.watch(prefix) as watch:
        assert set(await initial_state(watch)) == {f"{prefix}10.0.0.1", f"{prefix}10.0.0.2"}

        await kvserver.astop()
        with pytest.raises(KVUnavailableError) as exc:  # outside the prefix: whether it landed is unknown
            await kvstore.put(f"{bucket}/elsewhere/x", b"maybe")
        assert kvserver.url.split("//")[1] in str(exc.value) and "check that" in str(exc.value)
        await kvserver.astart()

        # Another client changes the prefix at once, most likely before the watch is back.
        writer = await kvconnect()
        await writer.put(f"{prefix}10.0.0.3", b"id-3")
        await writer.put(f"{prefix}10.0.0.1", b"id-1 changed")
        await writer.delete(f"{prefix}10.0.0.2")

        state = {f"{prefix}10.0.0.1": b"id-1", f"{prefix}10.0.0.2": b"id-2"}
        expected = {f"{prefix}10.0.0.1": b"id-1 changed", f"{prefix}10.0.0.3": b"id-3"}
        seen: list[WatchEvent] = []
        while state != expected:
            event = await next_item(watch, timeout=30)
            seen.append(event)
            if event.kind is EventKind.PUT:
                state[event.key] = event.value
            elif event.kind is EventKind.DELETE:
                state.pop(event.key)
        assert {e.key for e in seen if e.kind is EventKind.DELETE} == {f"{prefix}10.0.0.2"}

        # The original connection writes again, and the resumed watch keeps following.
        await eventually(
            lambda: kvstore.put(f"{prefix}10.0.0.4", b"id-4"),
            what="a write after the restart",
            ignore=(KVUnavailableError,),
        )
        event = await next_item(watch, timeout=30)
        assert (event.kind, event.key, event.value) == (EventKind.PUT, f"{prefix}10.0.0.4", b"id-4")


async def test_lease_expiry_removes_its_keys(kvstore: KVStore, bucket: str) -> None:
    lease = await kvstore.grant(LEASE_TTL)
    key = f"{bucket}/nodes/node1"
    await kvstore.put(key, b"alive", lease=lease)
    await kvstore.create(f"{bucket}/nodes/node1-lock", b"held", lease=lease)
    await kvstore.put(f"{bucket}/nodes/permanent", b"stays")

    async with kvstore.watch(f"{bucket}/nodes/") as watch:
        assert set(await initial_state(watch)) == {
            key,
            f"{bucket}/nodes/node1-lock",
            f"{bucket}/nodes/permanent",
        }

        async def gone() -> bool:
            return await kvstore.get(key) is None and await kvstore.get(f"{bucket}/nodes/node1-lock") is None

        await eventually(gone, timeout=LEASE_TTL + 8, what="the leased keys expiring")
        deleted = {(await next_item(watch)).key for _ in range(2)}
        assert deleted == {key, f"{bucket}/nodes/node1-lock"}
    assert await kvstore.get(f"{bucket}/nodes/permanent") is not None
    with pytest.raises(LeaseExpiredError):
        await kvstore.keepalive(lease)


async def test_keepalive_keeps_leased_keys_and_their_revisions(kvstore: KVStore, bucket: str) -> None:
    kept, dropped = await kvstore.grant(LEASE_TTL), await kvstore.grant(LEASE_TTL)
    kept_key, dropped_key = f"{bucket}/nodes/kept", f"{bucket}/nodes/dropped"
    revision = await kvstore.put(kept_key, b"kept", lease=kept)
    await kvstore.put(dropped_key, b"dropped", lease=dropped)

    async with kvstore.watch(f"{bucket}/nodes/") as watch:
        await initial_state(watch)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5 * LEASE_TTL
        dropped_at: float | None = None
        # Keep one lease alive until the other's key has expired, and for a whole TTL after that.
        while dropped_at is None or loop.time() < dropped_at + LEASE_TTL:
            assert loop.time() < deadline, "the key of the lease that was not kept alive did not expire"
            await kvstore.keepalive(kept)
            entry = await kvstore.get(kept_key)
            assert entry is not None and (entry.value, entry.revision) == (b"kept", revision)
            if dropped_at is None and await kvstore.get(dropped_key) is None:
                dropped_at = loop.time()
            await asyncio.sleep(LEASE_TTL / 4)  # the pace of keepalives, not a wait for state

        # Keepalives are not changes: the only event before the marker write is the dropped key's DELETE.
        marker = await kvstore.put(f"{bucket}/nodes/marker", b"m")
        events = await events_until(watch, WatchEvent(EventKind.PUT, f"{bucket}/nodes/marker", b"m", marker))
        assert [(e.kind, e.key) for e in events[:-1]] == [(EventKind.DELETE, dropped_key)]


async def test_revoke_removes_the_keys_at_once(kvstore: KVStore, bucket: str) -> None:
    lease = await kvstore.grant(60)
    key = f"{bucket}/locks/identity-1000"
    await kvstore.create(key, b"node1", lease=lease)
    await kvstore.put(f"{bucket}/locks/other", b"not leased")

    await kvstore.revoke(lease)

    assert await kvstore.get(key) is None
    assert await kvstore.get(f"{bucket}/locks/other") is not None
    with pytest.raises(LeaseExpiredError):
        await kvstore.keepalive(lease)
    with pytest.raises(LeaseExpiredError):
        await kvstore.put(key, b"again", lease=lease)
    await kvstore.revoke(lease)  # revoking twice is not an error


async def test_concurrent_create_if_absent_has_exactly_one_winner(kvconnect: KVConnect, bucket: str) -> None:
    stores = [await kvconnect() for _ in range(4)]
    key = f"{bucket}/identities/labels/ab12"
    n = 24

    results = await asyncio.gather(
        *(stores[i % len(stores)].create(key, f"allocator-{i}".encode()) for i in range(n)),
        return_exceptions=True,
    )

    winners = [(i, r) for i, r in enumerate(results) if isinstance(r, int)]
    losers = [r for r in results if isinstance(r, KeyExistsError)]
    assert len(winners) == 1, results
    assert len(losers) == n - 1, results
    ((index, revision),) = winners
    entry = await stores[0].get(key)
    assert entry is not None and (entry.value, entry.revision) == (f"allocator-{index}".encode(), revision)
    assert {loser.revision for loser in losers} == {revision}


@pytest.mark.parametrize("scheme", ["nats", "etcd"])
async def test_connect_to_a_server_that_is_not_there_says_what_to_check(scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{free_port()}"
    with pytest.raises(KVUnavailableError) as exc:
        await connect(url, timeout=1.0)
    assert url in str(exc.value) and "check that" in str(exc.value)


async def test_connect_logs_in_to_nats_with_the_given_user(tmp_path: Path, bucket: str) -> None:
    port = free_port()
    argv = [find_binary("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path)]
    argv += ["--user", "cilia-agent", "--pass", "s3cret"]
    server = ServerProcess(
        "nats-server", argv, f"nats://127.0.0.1:{port}", nats_ready(port), tmp_path / "log"
    )
    server.start()
    try:
        store = await connect(
            "nats", server.url, nats_user="cilia-agent", nats_password="s3cret", timeout=2.0
        )
        await store.put(f"{bucket}/x/y", b"z")
        await store.close()
        with pytest.raises(KVUnavailableError) as exc:
            await connect("nats", server.url, nats_user="cilia-agent", nats_password="wrong", timeout=1.0)
        assert "user and password" in str(exc.value) and "s3cret" not in str(exc.value)
    finally:
        server.stop()


async def test_connect_nats_uses_the_nats_url(nats_server: ServerProcess, bucket: str) -> None:
    nats_server.start()
    store = await connect("nats", nats_url=nats_server.url, timeout=2.0)
    try:
        await store.put(f"{bucket}/x/y", b"z")
        entry = await store.get(f"{bucket}/x/y")
        assert entry is not None and entry.value == b"z"
    finally:
        await store.close()
