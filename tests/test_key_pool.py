"""The spare-key pool: keys made ahead are handed out once each, and the filler tops the pool up."""

import itertools

import trio

from lafs_core.grid.key_pool import KeyPool


def counting_maker():
    counter = itertools.count()
    return lambda: next(counter)  # stands in for an RSA key: only identity matters here


def test_take_without_a_filler_makes_a_key_on_demand():
    async def main():
        pool = KeyPool(counting_maker())
        assert [await pool.take(), await pool.take()] == [0, 1]
        assert pool.spare == 0

    trio.run(main)


def test_the_filler_keeps_spares_and_never_hands_one_out_twice():
    trio.run(filler_scenario)


async def filler_scenario():
    pool = KeyPool(counting_maker())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.keep_filled, 3)
        while pool.spare < 3:
            await trio.sleep(0.001)
        taken = [await pool.take() for _ in range(5)]
        while pool.spare < 3:
            await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert len(set(taken)) == 5
    assert pool.spare == 3
