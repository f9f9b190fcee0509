"""Batch inference over a whole log (IAT export, SIF export): data-parallel over CPU cores.

Why threads with one torch thread each instead of torch's intra-op threads: the per-batch ops here are small
(a few MB), and splitting each of them over cores costs more synchronisation than it saves. On the 2-core
development machine the IAT source export ran at ~27k instances/s with 2 intra-op threads and ~38k/s with 2
worker threads × 1 intra-op thread (``benchmarks/bench_store.py``). Torch kernels release the GIL, so Python
threads suffice; batch building is NumPy, which releases it too for the large gathers.

Example:
    >>> import numpy as np, torch
    >>> out = np.zeros((10, 2), np.float32)
    >>> def job(rows):
    ...     out[rows] = torch.ones(len(rows), 2).numpy() * rows[:, None]
    >>> map_row_batches(job, n_rows=10, batch_size=4, workers=2, progress=False)
    >>> out[:, 0].tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm


def default_workers() -> int:
    """Cores this process may use (respects CPU affinity / container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def map_row_batches(
    fn: Callable[[np.ndarray], None],
    n_rows: int,
    batch_size: int,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "batches",
) -> None:
    """Call ``fn(rows)`` for consecutive row batches [0, batch_size), [batch_size, 2·batch_size), ... on
    ``workers`` threads, each in inference mode with one torch intra-op thread; ``fn`` writes its result into
    disjoint rows of a preallocated output. The process-wide torch thread count is restored afterwards."""
    workers = workers or default_workers()
    starts = range(0, n_rows, batch_size)

    def run(start: int) -> int:
        rows = np.arange(start, min(start + batch_size, n_rows))
        with torch.inference_mode():
            fn(rows)
        return len(rows)

    threads = torch.get_num_threads()
    torch.set_num_threads(1 if workers > 1 else threads)
    try:
        with tqdm(total=n_rows, desc=desc, unit="rows", disable=None if progress else True) as bar:
            if workers == 1:
                for s in starts:
                    bar.update(run(s))
            else:
                with ThreadPoolExecutor(workers) as pool:
                    for done in pool.map(run, starts):
                        bar.update(done)
    finally:
        torch.set_num_threads(threads)
