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


def _timed_score_many(cost_of_group):
    """A score_many that takes cost_of_group(G) seconds for G requests (a model's measured shape)."""
    import time

    def score_many(qs):
        time.sleep(cost_of_group(len(qs)))
        return qs

    return score_many


def test_auto_batching_batches_only_where_a_shared_forward_is_faster():
    """--max-batch-candidates auto: a model whose forward costs more per request in a group (DIN's per-candidate
    attention once it leaves the cache) scores one request at a time; one whose fixed cost dominates batches."""
    from sampletok.serving.batcher import calibrate_batch_candidates

    superlinear = _timed_score_many(lambda g: 0.004 * g * g)  # 2 together: 2× slower each
    chosen, per_request = calibrate_batch_candidates(superlinear, "probe", 100, groups=(1, 2, 4), repeats=2)
    assert chosen == 100 and per_request[4] > per_request[1]
    fixed_cost = _timed_score_many(lambda g: 0.012 + 0.001 * g)  # a fixed 12 ms, 1 ms a request
    chosen, per_request = calibrate_batch_candidates(fixed_cost, "probe", 100, groups=(1, 2, 4, 8), repeats=2)
    assert chosen == 800 and per_request[8] < per_request[1] / 3
    cliff = _timed_score_many({1: 0.010, 2: 0.012, 4: 0.040, 8: 0.160}.__getitem__)  # fastest in pairs
    chosen, _ = calibrate_batch_candidates(cliff, "probe", 50, groups=(1, 2, 4, 8), repeats=2)
    assert chosen == 100


def test_auto_batching_values_are_checked_in_one_line():
    from sampletok.errors import ConfigError, validated
    from sampletok.serving.config import ServingConfig

    assert ServingConfig().max_batch_candidates == "auto"
    assert validated(ServingConfig, {"max_batch_candidates": "64"}).max_batch_candidates == 64
    with pytest.raises(ConfigError, match="max_batch_candidates: expected a number of candidates or auto") as e:
        validated(ServingConfig, {"max_batch_candidates": "lots"}, where="serve")
    assert "\n" not in str(e.value)
