"""The dynamic batcher: groups bounded by candidates and wait, order kept, a full queue refused, a failure
kept to the requests it belongs to; and in the service, 503 with Retry-After when full."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sampletok.serving.batcher import Batcher, Overloaded


def test_groups_hold_at_most_the_candidate_budget_in_arrival_order():
    groups: list[list[int]] = []
    b = Batcher(lambda qs: (groups.append(list(qs)), qs)[1], max_batch_candidates=10, max_wait_us=50_000)

    async def main():
        return await asyncio.gather(*(b.score(i, size=4) for i in range(7)))

    assert asyncio.run(main()) == list(range(7))
    b.close()
    assert [q for g in groups for q in g] == list(range(7))  # FIFO
    assert all(len(g) * 4 <= 10 for g in groups) and max(len(g) for g in groups) == 2  # 2 × 4 fit, 3 × 4 do not


def test_a_call_runs_alone_in_queue_order():
    seen: list[str] = []
    gate = threading.Event()

    def score_many(qs):
        gate.wait(5)
        seen.extend(f"score {q}" for q in qs)
        return qs

    b = Batcher(score_many, max_batch_candidates=100, max_wait_us=0)

    async def main():
        first = asyncio.ensure_future(b.score(0, 1))
        await asyncio.sleep(0.05)  # the worker holds request 0
        rest = [asyncio.ensure_future(b.score(1, 1)), asyncio.ensure_future(b.run(lambda: seen.append("call")))]
        rest.append(asyncio.ensure_future(b.score(2, 1)))
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, *rest)

    asyncio.run(main())
    b.close()
    assert seen == ["score 0", "score 1", "call", "score 2"]  # request 2 never jumps the append before it


def test_a_full_queue_refuses_at_once():
    gate = threading.Event()
    b = Batcher(lambda qs: (gate.wait(5), qs)[1], max_wait_us=0, max_queue=2)

    async def main():
        held = asyncio.ensure_future(b.score("held", 1))
        await asyncio.sleep(0.05)  # taken by the worker, which blocks
        queued = [asyncio.ensure_future(b.score(i, 1)) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="capacity"):
            await b.score("one too many", 1)
        gate.set()
        return await asyncio.gather(held, *queued)

    assert asyncio.run(main()) == ["held", 0, 1]
    b.close()


def test_a_failure_reaches_only_its_requests():
    def score_many(qs):
        if "boom" in qs:
            raise RuntimeError("the store is down")
        return [ValueError(f"bad {q}") if q < 0 else q for q in qs]

    b = Batcher(score_many, max_batch_candidates=2, max_wait_us=50_000)

    async def main():
        return await asyncio.gather(*(b.score(q, 1) for q in (1, -1, "boom", 3)), return_exceptions=True)

    one, bad, boom, three = asyncio.run(main())
    b.close()
    assert one == 1 and isinstance(bad, ValueError) and str(bad) == "bad -1"
    assert isinstance(boom, RuntimeError) and isinstance(three, RuntimeError)  # grouped with the failing request
