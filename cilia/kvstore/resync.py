"""The events that bring a watcher up to date after it had to list a prefix again (a pure function)."""

from __future__ import annotations

from collections.abc import Mapping

from cilia.kvstore.base import Entry, EventKind, WatchEvent


def resync(known: Mapping[str, int], current: Mapping[str, Entry], revision: int) -> list[WatchEvent]:
    """PUT for keys that are new or at another revision than `known`, then DELETE for keys now gone.

    `known` maps each key the watcher has reported to its revision; `current` is the new listing;
    `revision` is the store revision at which the listing saw the deleted keys absent.
    """
    puts = [
        WatchEvent(EventKind.PUT, entry.key, entry.value, entry.revision)
        for entry in sorted(current.values(), key=lambda e: e.revision)
        if known.get(entry.key) != entry.revision
    ]
    deletes = [
        WatchEvent(EventKind.DELETE, key, b"", revision) for key in sorted(known) if key not in current
    ]
    return puts + deletes
