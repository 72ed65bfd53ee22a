"""Reading the datapath's pinned ring buffer of events in a thread, feeding the event loop.

The poll loop runs in its own thread (libbcc's ring-buffer manager blocks); each event is copied
and handed to the asyncio loop through a bounded queue. When the agent cannot keep up, events are
dropped and counted rather than slowing the thread that drains the kernel's buffer.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
from pathlib import Path

from services.datapath import maps
from services.datapath.eventtypes import RawEvent

log = logging.getLogger("cilia.datapath.events")


class EventReader:
    """Polls `<pin root>/events` and puts `RawEvent`s on `queue`."""

    def __init__(self, path: Path, queue: asyncio.Queue[RawEvent], loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self.queue = queue
        self.loop = loop
        self.lost = 0
        self.malformed = 0
        self.received = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self, ev: RawEvent) -> None:
        try:
            self.queue.put_nowait(ev)
        except asyncio.QueueFull:
            self.lost += 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cilia-ringbuf", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from bcc.libbcc import _RINGBUF_CB_TYPE, lib

        fd = maps.obj_get(self.path)

        def callback(_ctx: object, data: int, size: int) -> int:
            try:
                raw = ctypes.string_at(data, size)
                ev = RawEvent.decode(raw)
                self.received += 1
                self.loop.call_soon_threadsafe(self._put, ev)
            except Exception:
                self.malformed += 1
            return 0

        cb = _RINGBUF_CB_TYPE(callback)
        manager = lib.bpf_new_ringbuf(fd, cb, None)
        if not manager:
            log.error("event=ringbuf-open-failed path=%s", self.path)
            return
        try:
            while not self._stop.is_set():
                lib.bpf_poll_ringbuf(manager, 200)
        finally:
            lib.bpf_free_ringbuf(manager)
            import os

            os.close(fd)
