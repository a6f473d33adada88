"""Call slots: never more than ``n`` holders, older chunks (lower priority numbers) served first,
arrival order within a priority, and a cancelled waiter costs nobody a slot."""

from __future__ import annotations

import asyncio

import pytest

from workers.slots import Slots


def test_lower_priority_numbers_go_first_then_arrival_order() -> None:
    async def main() -> list[str]:
        slots = Slots(1)
        served: list[str] = []

        async def take(name: str, priority: int) -> None:
            async with slots.hold(priority):
                served.append(name)
                await asyncio.sleep(0.001)

        await slots.acquire()  # the one slot is busy while the others queue
        tasks = [
            asyncio.create_task(take(name, prio))
            for name, prio in [("new-1", 2), ("new-2", 2), ("old-retry", 1), ("new-3", 2)]
        ]
        await asyncio.sleep(0.01)
        slots.release()
        await asyncio.gather(*tasks)
        assert slots.in_use == 0
        return served

    assert asyncio.run(main()) == ["old-retry", "new-1", "new-2", "new-3"]


def test_never_more_holders_than_slots() -> None:
    async def main() -> int:
        slots = Slots(3)
        most = 0

        async def work(i: int) -> None:
            nonlocal most
            async with slots.hold(i % 2):
                most = max(most, slots.in_use)
                await asyncio.sleep(0.002)

        await asyncio.gather(*(work(i) for i in range(40)))
        assert slots.in_use == 0
        return most

    assert asyncio.run(main()) == 3


def test_a_cancelled_waiter_does_not_keep_a_slot() -> None:
    async def main() -> None:
        slots = Slots(1)
        await slots.acquire()
        waiting = asyncio.create_task(slots.acquire(0))
        later = asyncio.create_task(slots.acquire(5))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        slots.release()  # goes to the next live waiter, not the cancelled one
        await asyncio.wait_for(later, 1)
        assert slots.in_use == 1
        slots.release()
        assert slots.in_use == 0

    asyncio.run(main())


def test_a_slot_granted_to_a_waiter_cancelled_before_it_resumed_is_passed_on() -> None:
    async def main() -> None:
        slots = Slots(1)
        await slots.acquire()
        first = asyncio.create_task(slots.acquire())
        second = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0.01)
        slots.release()  # granted to ``first`` ...
        first.cancel()  # ... which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, 1)
        assert slots.in_use == 1

    asyncio.run(main())


def test_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        Slots(0)
