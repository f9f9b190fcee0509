"""History fetch speed: HistoryIndex.fetch vs a plain NumPy gather of the same bytes vs dataframe/SQL peers.

Run: python benchmarks/bench_history.py [--rows 2000000] [--users 20000] [--batch 4096] [--n 256]
     [--peers pandas,polars,duckdb]   (duckdb and pandas: pip install -e '.[bench]')

The NumPy gather reads precomputed row ids (the lower bound: only the memory traffic of the answer). Each peer
answers the same question the idiomatic way on the whole batch: pandas and polars join the requests to the log
on user, keep ts < request, sort, take each request's last n; DuckDB runs the equivalent window query
(ROW_NUMBER over each request's rows by time, newest first, <= n) on the log loaded as a native table. Every
peer must return exactly HistoryIndex's row ids (same rows, same time order per request), so the times compare
equal answers. HistoryIndex is single-threaded NumPy; polars and DuckDB use every core.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from sampletok.history import History, HistoryIndex


def timeit(fn: Callable[[], object], repeat: int = 5) -> float:
    """Best of ``repeat`` timed calls after one warm-up call (seconds)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def assert_same_rows(name: str, q: np.ndarray, rows: np.ndarray, h: History) -> None:
    """A peer's (request, row) answer, ordered by request then time, must be HistoryIndex's rows exactly."""
    expect_q = np.repeat(np.arange(len(h.n_past)), h.n_past)
    if not (
        np.array_equal(np.asarray(q, np.int64), expect_q) and np.array_equal(np.asarray(rows, np.int64), h.rows[h.mask])
    ):
        raise AssertionError(f"{name} and HistoryIndex return different row ids")


def pandas_peer(user: np.ndarray, ts: np.ndarray, qu: np.ndarray, qt: np.ndarray, n: int):
    import pandas as pd

    log = pd.DataFrame({"user": user, "ts": ts, "row": np.arange(len(ts))})
    req = pd.DataFrame({"user": qu, "req_ts": qt, "q": np.arange(len(qu))})

    def fetch() -> tuple[np.ndarray, np.ndarray]:
        m = req.merge(log, on="user")
        m = m[m.ts < m.req_ts].sort_values(["q", "ts", "row"])
        m = m.groupby("q").tail(n)
        return m["q"].to_numpy(), m["row"].to_numpy()

    return fetch


def polars_peer(user: np.ndarray, ts: np.ndarray, qu: np.ndarray, qt: np.ndarray, n: int):
    import polars as pl

    log = pl.DataFrame({"user": user, "ts": ts, "row": np.arange(len(ts))})
    req = pl.DataFrame({"user": qu, "req_ts": qt, "q": np.arange(len(qu))})

    def fetch() -> tuple[np.ndarray, np.ndarray]:
        m = (
            req.join(log, on="user")
            .filter(pl.col("ts") < pl.col("req_ts"))
            .sort(["q", "ts", "row"])
            .group_by("q", maintain_order=True)
            .tail(n)
        )
        return m["q"].to_numpy(), m["row"].to_numpy()

    return fetch


def duckdb_peer(user: np.ndarray, ts: np.ndarray, qu: np.ndarray, qt: np.ndarray, n: int):
    import duckdb
    import pyarrow as pa

    con = duckdb.connect()
    # the log as a native table, loaded once (as a database holding the log would have it); not timed
    con.register("log_arrow", pa.table({"user": user, "ts": ts, "row": np.arange(len(ts))}))
    con.execute("CREATE TABLE log AS SELECT * FROM log_arrow")
    con.unregister("log_arrow")
    req = pa.table({"user": qu, "req_ts": qt, "q": np.arange(len(qu))})
    sql = f"""
        SELECT q, row FROM (
            SELECT r.q, l.row, l.ts,
                   ROW_NUMBER() OVER (PARTITION BY r.q ORDER BY l.ts DESC, l.row DESC) AS rn
            FROM req r JOIN log l ON l.user = r.user AND l.ts < r.req_ts)
        WHERE rn <= {int(n)} ORDER BY q, ts, row"""

    def fetch() -> tuple[np.ndarray, np.ndarray]:
        con.register("req", req)
        out = con.execute(sql).fetchnumpy()
        return out["q"], out["row"]

    return fetch, duckdb.__version__


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--peers", default="pandas,polars,duckdb", help="comma-separated peers to time")
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
    import polars as pl

    peers: list[tuple[str, float]] = []
    for name in [p.strip() for p in a.peers.split(",") if p.strip()]:
        if name == "pandas":
            import pandas as pd

            fetch = pandas_peer(user, ts, qu, qt, a.n)
            label = f"pandas {pd.__version__} merge / filter / sort / tail"
        elif name == "polars":
            fetch = polars_peer(user, ts, qu, qt, a.n)
            label = f"polars {pl.__version__} join / filter / sort / group tail"
        elif name == "duckdb":
            fetch, version = duckdb_peer(user, ts, qu, qt, a.n)
            label = f"DuckDB {version} join + ROW_NUMBER() window, native table"
        else:
            raise SystemExit(f"unknown peer {name!r}; use pandas, polars, duckdb")
        assert_same_rows(name, *fetch(), h)  # the same answer, or the time means nothing
        peers.append((label, timeit(fetch, repeat=3)))
    print(
        f"log: {a.rows:,} rows, {a.users:,} users; batch {a.batch} requests × n = {a.n} "
        f"({int(h.mask.sum()):,} rows returned)"
    )
    print("| method | ms per batch | vs HistoryIndex |\n|---|---|---|")
    print(f"| `HistoryIndex.fetch` (rows, mask, gaps, per-label availability) | {fast * 1e3:.1f} | 1.0× |")
    print(
        f"| NumPy gather of the same bytes (lower bound) | {gather * 1e3:.1f} | "
        f"HistoryIndex is {fast / gather:.2f}× the gather |"
    )
    for label, t in peers:
        print(f"| {label} (same row ids, asserted) | {t * 1e3:.0f} | {t / fast:.1f}× slower than HistoryIndex |")
    print(f"index build: {build:.2f} s")


if __name__ == "__main__":
    main()
