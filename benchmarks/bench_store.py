"""Token store: fetch latency for B × T tokens, bytes per instance per payload dtype, and IAT export
throughput of the default source model.

Run: python benchmarks/bench_store.py [--rows 1000000] [--dim 64] [--batch 4096] [--T 256]
     python benchmarks/bench_store.py --export-ml100k ../shared/data/ml-100k
     python benchmarks/bench_store.py --backends --rows 200000 --users 4096 --dim 32
       (local vs Redis on the same fetch: it starts its own redis-server on a loopback port)
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from sampletok.store import LocalTokenStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--export-ml100k", type=Path, default=None)
    ap.add_argument("--backends", action="store_true", help="only the local-vs-Redis fetch comparison")
    ap.add_argument("--repeats", type=int, default=20, help="--backends: timed fetches per backend")
    a = ap.parse_args()
    if a.backends:
        compare_backends(a)
        return
    rng = np.random.default_rng(0)
    user = rng.integers(0, a.users, a.rows)
    ts = rng.integers(0, 10**8, a.rows)
    emb = rng.normal(size=(a.rows, a.dim)).astype(np.float32)
    responses = rng.integers(0, 2, (a.rows, 2)).astype(np.float32)
    print(f"| dtype | payload B/instance | total B/instance | write s | fetch ms ({a.batch}×{a.T}) | max abs error |")
    print("|---|---|---|---|---|---|")
    for dtype in ("float32", "float16", "int8"):
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            s = LocalTokenStore.create(Path(d) / "s", "bench", (a.dim,), ["click", "conv"], dtype=dtype)
            s.append(np.arange(a.rows), user, ts, emb, responses)
            s.commit()
            write = time.perf_counter() - t
            s = LocalTokenStore.open(Path(d) / "s").load_into_memory()
            qu, qt = rng.integers(0, a.users, a.batch), rng.integers(5 * 10**7, 10**8, a.batch)
            s.fetch(qu, qt, a.T)
            # bound now (B023): each timing calls this store's fetch of this query
            best = min(_time(functools.partial(s.fetch, qu, qt, a.T)) for _ in range(3))
            f = s.fetch(qu, qt, a.T)
            err = float(np.abs(f.payload[f.mask] - emb[np.asarray(s.columns()["instance_id"])[f.seq[f.mask]]]).max())
            b = s.bytes_per_instance()
            print(f"| {dtype} | {b['payload']:.0f} | {b['total']:.0f} | {write:.2f} | {best * 1e3:.0f} | {err:.4f} |")
    if a.export_ml100k:
        from sampletok.data.prepare import prepare
        from sampletok.data.sources.movielens import load_movielens
        from sampletok.features import FeatureLayout
        from sampletok.tokenizers.iat import IATSourceConfig, SourceModel
        from sampletok.tokens.iat import embed_all

        with tempfile.TemporaryDirectory() as d:
            src, schema = load_movielens(a.export_ml100k)
            ds = prepare(src, schema, Path(d) / "ml", progress=False).load_into_memory()
            from sampletok.nn.inference import default_workers

            workers = default_workers()
            print(f"\nIAT export, pre-SIT, {ds.n_rows:,} instances\n")
            print(
                f"| source model | 1 worker × {torch.get_num_threads()} torch threads | {workers} workers × 1 torch "
                "thread (default) |\n|---|---|---|"
            )
            # the default source reads the schema's item-ID history (50 on ml-100k) with DIN attention; shorter
            # or no history shows what that branch costs
            for hist_len, what in ((None, "default (history 50)"), (20, "history 20"), (0, "no history branch")):
                model = SourceModel(FeatureLayout.from_dataset(ds), IATSourceConfig(hist_len=hist_len))
                rates = []
                for w in (1, workers):
                    embed_all(model, ds, progress=False, workers=w)  # warm-up
                    run = functools.partial(embed_all, model, ds, progress=False, workers=w)
                    sec = min(_time(run) for _ in range(3))
                    rates.append(ds.n_rows / sec)
                print(f"| {what} | {rates[0]:,.0f} /s | {rates[1]:,.0f} /s |", flush=True)


def compare_backends(a) -> None:
    """The same B × T fetch (float16 payload, 2 responses) from the local store and from a Redis server on
    loopback: tokens/s and latency percentiles over ``--repeats`` fetches of fresh random requests."""
    from sampletok.store import LocalTokenStore
    from sampletok.store.redis import RedisTokenStore, local_redis_server

    rng = np.random.default_rng(0)
    user = rng.integers(0, a.users, a.rows)
    ts = rng.integers(0, 10**8, a.rows)
    emb = rng.normal(size=(a.rows, a.dim)).astype(np.float32)
    responses = rng.integers(0, 2, (a.rows, 2)).astype(np.float32)
    args = ("bench", (a.dim,), ["click", "conv"])
    print(f"{a.rows:,} instances of {a.users:,} users, {a.dim}-d float16; fetch {a.batch} users × {a.T} tokens\n")
    print("| backend | write s | fetch P50 ms | fetch P99 ms | tokens/s | tokens returned |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d, local_redis_server(d) as url:
        stores = {}
        t = time.perf_counter()
        local = LocalTokenStore.create(Path(d) / "local", *args)
        local.append(np.arange(a.rows), user, ts, emb, responses)
        local.commit()
        stores["local"] = (LocalTokenStore.open(Path(d) / "local").load_into_memory(), time.perf_counter() - t)
        t = time.perf_counter()
        remote = RedisTokenStore.create(url + "?store=bench", *args)
        for i in range(0, a.rows, 50_000):  # the way an export writes: bounded transactions
            sl = slice(i, i + 50_000)
            remote.append(np.arange(a.rows)[sl], user[sl], ts[sl], emb[sl], responses[sl])
        remote.commit()
        stores["redis"] = (RedisTokenStore.open(url + "?store=bench"), time.perf_counter() - t)
        queries = [
            (rng.integers(0, a.users, a.batch), rng.integers(5 * 10**7, 10**8, a.batch)) for _ in range(a.repeats)
        ]
        ref = stores["local"][0].fetch(*queries[0], a.T)
        for name, (store, write) in stores.items():
            got = store.fetch(*queries[0], a.T)  # warm-up, and the same answer as the local store
            assert np.array_equal(got.mask, ref.mask) and np.array_equal(got.payload, ref.payload), name
            lat, tokens = [], 0
            for qu, qt in queries:
                t = time.perf_counter()
                f = store.fetch(qu, qt, a.T)
                lat.append(time.perf_counter() - t)
                tokens += int(f.mask.sum())
            p50, p99 = np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3
            rate, per = tokens / sum(lat), tokens / len(lat)
            print(f"| {name} | {write:.1f} | {p50:.0f} | {p99:.0f} | {rate:,.0f} | {per:,.0f} |")
        stores["redis"][0].close()


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
