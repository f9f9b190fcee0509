"""Encoding served rows: the plain-Python kernel (``Encoder(kernel="auto")``, what the service uses) against
the polars reference (``kernel="polars"``) on the first rows of ml-100k given as dicts (the request's features),
best of ``--repeats`` per row count, with the ratio.

Run: python benchmarks/bench_encoder.py --data ../shared/data/ml-100k [--rows 1,100,256,1000,3200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    from sampletok.data.encoder import Encoder
    from sampletok.data.prepare import prepare
    from sampletok.data.sources.movielens import load_movielens

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/ml-100k")
    ap.add_argument("--rows", default="1,100,256,1000,3200")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    source, schema = load_movielens(Path(a.data))
    with tempfile.TemporaryDirectory() as d:
        ds = prepare(source, schema, Path(d) / "ds", progress=False)
        kernels = {k: Encoder(ds.schema, ds.stats, kernel=k) for k in ("auto", "polars")}
        features = {f.name for f in ds.schema.features}
        sizes = [int(n) for n in a.rows.split(",")]
        rows = [{k: v for k, v in r.items() if k in features} for r in source.frame.head(max(sizes)).to_dicts()]
        print("\n| rows | plain-Python kernel ms | polars reference ms | ratio |\n|---|---|---|---|")
        for n in sizes:
            ms = {}
            for name, enc in kernels.items():
                enc.encode(rows[:n])  # warm-up
                best = float("inf")
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    enc.encode(rows[:n])
                    best = min(best, time.perf_counter() - t0)
                ms[name] = best * 1e3
            print(f"| {n} | {ms['auto']:.2f} | {ms['polars']:.2f} | {ms['polars'] / ms['auto']:.1f}× |")


if __name__ == "__main__":
    main()
