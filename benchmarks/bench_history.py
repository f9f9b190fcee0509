"""History fetch speed: HistoryIndex.fetch vs a plain NumPy gather of the same bytes vs pandas.

Run: python benchmarks/bench_history.py [--rows 2000000] [--users 20000] [--batch 4096] [--n 256]
The NumPy gather reads precomputed row ids (the lower bound: only the memory traffic of the answer);
pandas answers the same question the idiomatic way (merge on user, filter ts < request, sort, tail n).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from sampletok.data.history import HistoryIndex


def timeit(fn, repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--pandas-batch", type=int, default=256, help="requests for the pandas run (it is slow)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    user = rng.integers(0, a.users, a.rows)
    ts = rng.integers(0, 10**8, a.rows)
    t0 = time.perf_counter()
    idx = HistoryIndex(user, ts, [0, 3600])
    build = time.perf_counter() - t0
    qu = rng.integers(0, a.users, a.batch)
    qt = rng.integers(5 * 10**7, 10**8, a.batch)
    fast = timeit(lambda: idx.fetch(qu, qt, a.n))
    h = idx.fetch(qu, qt, a.n)
    safe = np.where(h.mask, h.rows, 0)
    payload_ts = ts.copy()

    def numpy_gather():  # the answer's bytes: rows, mask, gaps, label masks from known row ids
        r = payload_ts[safe]
        return safe.copy(), h.mask.copy(), (qt[:, None] - r).astype(np.float32), np.repeat(h.mask[:, :, None], 2, 2)

    gather = timeit(numpy_gather)
    import pandas as pd

    log = pd.DataFrame({"user": user, "ts": ts, "row": np.arange(a.rows)})
    k = a.pandas_batch
    req = pd.DataFrame({"user": qu[:k], "req_ts": qt[:k], "q": np.arange(k)})

    def pandas_fetch():
        m = req.merge(log, on="user")
        m = m[m.ts < m.req_ts].sort_values(["q", "ts", "row"])
        return m.groupby("q").tail(a.n)

    pd_t = timeit(pandas_fetch, repeat=2) * (a.batch / k)
    got = pandas_fetch()
    ref = idx.fetch(qu[:k], qt[:k], a.n)
    assert len(got) == int(ref.mask.sum()), "pandas and HistoryIndex disagree"
    print(f"log: {a.rows:,} rows, {a.users:,} users; batch {a.batch} requests × n = {a.n}")
    print(f"| method | ms per batch | vs HistoryIndex |\n|---|---|---|")
    print(f"| HistoryIndex.fetch | {fast * 1e3:.1f} | 1.0× |")
    print(f"| NumPy gather of the same bytes (lower bound) | {gather * 1e3:.1f} | {fast / gather:.2f}× slower than gather |")
    print(f"| pandas merge/filter/sort/tail (scaled from {k} requests) | {pd_t * 1e3:.0f} | {pd_t / fast:.0f}× slower |")
    print(f"index build: {build:.2f} s")


if __name__ == "__main__":
    main()
