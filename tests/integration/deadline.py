"""Waiting for state in integration tests: poll with a deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

POLL_INTERVAL = 0.05


async def eventually(
    check: Callable[[], Awaitable[T]],
    *,
    timeout: float = 10.0,
    what: str = "the condition",
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Await `check()` until it returns something truthy, and return that; fail after `timeout` seconds.

    Exceptions of the types in `ignore` count as "not yet" (a server that is restarting, say).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    while True:
        try:
            result = await check()
            if result:
                return result
            last = result
        except ignore as err:
            last = err
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s (last: {last!r})")
        await asyncio.sleep(POLL_INTERVAL)


async def next_item(items: AsyncIterator[T], timeout: float = 10.0) -> T:
    """The iterator's next item, failing the test if none comes within `timeout` seconds."""
    try:
        return await asyncio.wait_for(anext(items), timeout)
    except TimeoutError:
        raise AssertionError(f"nothing arrived within {timeout} s") from None
