"""The router's account of KV in flight to each decode instance's receive buffer."""

from __future__ import annotations

import asyncio

import pytest

from router.receive_budget import ReceiveBudget, TooLarge


def test_a_reservation_waits_until_earlier_transfers_are_claimed():
    async def run():
        budget = ReceiveBudget(100)
        await budget.reserve("d0", 70)
        waiting = asyncio.create_task(budget.reserve("d0", 50))
        other = asyncio.create_task(budget.reserve("d1", 50))  # another instance's buffer is separate
        await other
        await asyncio.sleep(0)
        assert not waiting.done()
        await budget.release("d0", 70)
        await waiting
        return budget.used("d0"), budget.used("d1")

    assert asyncio.run(run()) == (50, 50)


def test_a_prompt_bigger_than_a_whole_buffer_is_refused():
    with pytest.raises(TooLarge, match="receive_buffer_mib"):
        asyncio.run(ReceiveBudget(10).reserve("d0", 11))


def test_releasing_more_than_reserved_is_a_bug():
    async def run():
        budget = ReceiveBudget(10)
        await budget.reserve("d0", 5)
        await budget.release("d0", 6)

    with pytest.raises(RuntimeError):
        asyncio.run(run())
