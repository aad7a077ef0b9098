"""The worker's slots: first come first served, a bounded wait, and no slot lost to a
waiter that leaves (cancelled while waiting, or just as it was handed one)."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.worker.slots import Slots


async def test_waiters_get_slots_in_arrival_order() -> None:
    slots = Slots(1, max_wait=60)
    await slots.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        await slots.acquire()
        order.append(i)

    waiters = [asyncio.create_task(take(i)) for i in range(5)]
    await asyncio.sleep(0)
    for _ in range(5):
        slots.release()
        await asyncio.sleep(0)
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2, 3, 4]


async def test_a_wait_ends_after_max_wait_and_later_waiters_keep_theirs() -> None:
    slots = Slots(1, max_wait=0.2)
    await slots.acquire()
    first = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0.1)
    second = asyncio.create_task(slots.acquire())
    with pytest.raises(TimeoutError):
        await first
    assert not second.done()  # its own deadline is later
    slots.release()
    await asyncio.wait_for(second, 1)


async def test_a_cancelled_waiter_loses_no_slot() -> None:
    slots = Slots(1, max_wait=60)
    await slots.acquire()
    gone = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    slots.release()  # goes to nobody, so the next acquire takes it at once
    await asyncio.wait_for(slots.acquire(), 1)


async def test_a_slot_handed_to_a_waiter_cancelled_meanwhile_is_passed_on() -> None:
    slots = Slots(1, max_wait=60)
    await slots.acquire()
    gone = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    nxt = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # handed to `gone`...
    gone.cancel()  # ...which is cancelled before it runs again
    await asyncio.gather(gone, return_exceptions=True)
    await asyncio.wait_for(nxt, 1)  # the slot went on to the next waiter
