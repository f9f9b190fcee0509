"""The service's dynamic batcher: concurrent /score requests grouped into one model forward, on one worker
thread off the event loop (Triton's dynamic batching, in-process).

A request waits in a bounded queue. The worker takes the oldest, then keeps taking score requests until the
group holds ``max_batch_candidates`` candidates or ``max_wait_us`` has passed since it took the first; the
group is scored by one call (:meth:`~sampletok.serving.scorer.Scorer.score_many`: one encode, one store round
trip, one forward, each request keeping its own history). Other work on the scorer (an event's append, a
health check) is a job of its own, run alone in queue order, so the scorer is only ever used by this one
thread: the local store's appends never race its readers, and a request sent after an event was
acknowledged reads it. A full queue refuses at once (:class:`Overloaded`: the service answers 503 with
Retry-After) instead of growing every request's latency without bound.

Example:
    >>> import asyncio
    >>> b = Batcher(lambda qs: [q * 10 for q in qs], max_batch_candidates=8, max_wait_us=1000)
    >>> async def main():
    ...     return await asyncio.gather(*(b.score(q, size=1) for q in range(3)))
    >>> asyncio.run(main()), b.largest_batch <= 3
    ([0, 10, 20], True)
    >>> b.close()
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sampletok.errors import SampletokError

Q = TypeVar("Q")
R = TypeVar("R")


class Overloaded(SampletokError):
    """The batcher's queue is full: the request is refused (503 with Retry-After), not queued."""


@dataclass
class _Job:
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    query: Any = None  # a score request
    size: int = 0  # its candidates
    call: Callable[[], Any] | None = None  # other work, run alone
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher(Generic[Q, R]):
    """Runs ``score_many`` (a list of requests → their results, one each, in order) over groups of concurrent
    requests, and other calls one at a time, all on one worker thread.

    Args:
        score_many: scores a group; a result that is an Exception is raised to that request alone.
        max_batch_candidates: the most candidates one group holds (a larger request is a group of its own).
        max_wait_us: how long the worker waits for more requests after taking a group's first.
        max_queue: the most jobs waiting; beyond it :meth:`score` and :meth:`run` raise :class:`Overloaded`.
        on_batch: called with (requests, candidates, seconds the group's oldest request queued) per group.
    """

    def __init__(
        self,
        score_many: Callable[[list[Q]], Sequence[R | Exception]],
        max_batch_candidates: int = 1000,
        max_wait_us: int = 500,
        max_queue: int = 16,
        on_batch: Callable[[int, int, float], None] | None = None,
    ):
        self.score_many, self.on_batch = score_many, on_batch
        self.max_batch_candidates, self.max_wait_s, self.max_queue = max_batch_candidates, max_wait_us / 1e6, max_queue
        self.largest_batch = 0  # the most requests one group held (tests, metrics)
        self._queue: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="sampletok-batcher", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs in the queue (not yet taken by the worker)."""
        return len(self._queue)

    async def score(self, query: Q, size: int) -> R:
        """The result of one request (``size`` candidates), scored with whatever else is waiting."""
        return await self._submit(_Job(*self._future(), query=query, size=size))

    async def run(self, call: Callable[[], Any], bounded: bool = True) -> Any:
        """``call()`` on the worker thread, alone, in queue order (an append, a store check); ``bounded=False``
        queues it even when the queue is full (a health check must not read as down under load)."""
        return await self._submit(_Job(*self._future(), call=call), bounded)

    def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _future() -> tuple[asyncio.Future, asyncio.AbstractEventLoop]:
        loop = asyncio.get_running_loop()
        return loop.create_future(), loop

    async def _submit(self, job: _Job, bounded: bool = True) -> Any:
        with self._cv:
            if self._closed:
                raise Overloaded("the service is shutting down")
            if bounded and len(self._queue) >= self.max_queue:
                raise Overloaded(f"the service is at capacity ({self.max_queue} requests queued); retry shortly")
            self._queue.append(job)
            self._cv.notify()
        return await job.future

    def _next_group(self) -> list[_Job] | None:
        """The next job alone (a call) or group of score requests; None once closed and drained."""
        with self._cv:
            while not self._queue:
                if self._closed:
                    return None
                self._cv.wait()
            first = self._queue.popleft()
            if first.call is not None:
                return [first]
            group, total = [first], first.size
            deadline = time.perf_counter() + self.max_wait_s
            while total < self.max_batch_candidates:
                if self._queue:
                    head = self._queue[0]
                    if head.call is not None or total + head.size > self.max_batch_candidates:
                        break  # a call keeps its place in order; a request that does not fit starts the next group
                    group.append(self._queue.popleft())
                    total += head.size
                    continue
                left = deadline - time.perf_counter()
                if left <= 0 or self._closed:
                    break
                self._cv.wait(left)
            return group

    def _work(self) -> None:
        while (group := self._next_group()) is not None:
            try:
                if group[0].call is not None:
                    results: Sequence[Any] = [group[0].call()]
                else:
                    results = self.score_many([j.query for j in group])
                    self.largest_batch = max(self.largest_batch, len(group))
                    if self.on_batch is not None:
                        self.on_batch(len(group), sum(j.size for j in group), time.perf_counter() - group[0].queued_at)
            except BaseException as e:  # the whole group failed (a store down, a bug): each request gets it
                results = [e] * len(group)
            for job, result in zip(group, results, strict=True):
                try:
                    job.loop.call_soon_threadsafe(_deliver, job.future, result)
                except RuntimeError:  # its event loop is closed: nobody waits for it
                    pass


def pick_batch_candidates(per_request_s: dict[int, float], request_size: int, min_gain: float = 0.1) -> int:
    """The batcher's ``max_batch_candidates`` from measured seconds per request when ``G`` requests of
    ``request_size`` candidates share one forward (``per_request_s[G]``, ``G = 1`` included): the ``G`` that
    scores a request fastest, when it beats one request alone by ``min_gain``, else one request's size (a model
    whose forward grows faster than its rows, as DIN's per-candidate attention does once its working set
    leaves the cache, gains nothing from cross-request batching; smaller requests still share a forward).

    Example:
        >>> pick_batch_candidates({1: 0.010, 2: 0.025, 4: 0.030}, 100)  # slower together: no batching
        100
        >>> pick_batch_candidates({1: 0.010, 2: 0.007, 4: 0.005, 8: 0.0052}, 100)
        400
    """
    if 1 not in per_request_s:
        raise ValueError("the timings need G = 1 (one request alone)")
    best = min(per_request_s, key=lambda g: (per_request_s[g], g))
    if best == 1 or per_request_s[best] > (1 - min_gain) * per_request_s[1]:
        best = 1
    return best * request_size


def calibrate_batch_candidates(
    score_many: Callable[[list[Q]], Sequence[Any]],
    probe: Q,
    request_size: int,
    groups: Sequence[int] = (1, 2, 4, 8),
    repeats: int = 3,
) -> tuple[int, dict[int, float]]:
    """(``max_batch_candidates``, seconds per request by ``G``): ``score_many`` timed on ``G`` copies of a
    ``probe`` request of ``request_size`` candidates (the best of ``repeats`` after one warm-up), chosen by
    :func:`pick_batch_candidates`. What ``--max-batch-candidates auto`` runs once at start, on the process's
    own threads, model and store."""
    timings: dict[int, float] = {}
    for g in groups:
        group = [probe] * g
        refused = [r for r in score_many(group) if isinstance(r, Exception)]  # warm-up (allocator, caches)
        if refused:
            raise ValueError(f"the probe request was refused: {refused[0]}")
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            score_many(group)
            best = min(best, time.perf_counter() - t0)
        timings[g] = best / g
    return pick_batch_candidates(timings, request_size), timings


def _deliver(future: asyncio.Future, result: Any) -> None:
    if future.done():  # the client went away (its request was cancelled)
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
