"""Preparation throughput and peak memory on a synthetic log (chunked: memory stays bounded by the chunk
plus 17 bytes of keys per row).

Run: python benchmarks/bench_prepare.py [--users 100000] [--fields 24]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    from sampletok.data.prepare import prepare
    from sampletok.data.sources.synthetic import SyntheticConfig, generate_source

    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=25_000)
    ap.add_argument("--events", type=float, default=80)
    ap.add_argument("--fields", type=int, default=24)
    a = ap.parse_args()
    cfg = SyntheticConfig(n_users=a.users, events_per_user=a.events, n_fields=a.fields, users_per_chunk=2000)
    src, schema = generate_source(cfg)
    t = time.perf_counter()
    n = sum(df.height for df in src.frames())
    gen = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        ds = prepare(src, schema, Path(d) / "p", progress=False)
        sec = time.perf_counter() - t
        size = sum(p.stat().st_size for p in (Path(d) / "p" / "columns").glob("*.npy"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{n:,} rows × {a.fields} fields: generate {n / gen:,.0f} rows/s; prepare (3 passes, generation "
        f"included) {n / sec:,.0f} rows/s ({sec:.1f} s); {size / n:.0f} bytes/row on disk; peak RSS {rss:,.0f} MiB"
    )
    assert ds.n_rows == n


if __name__ == "__main__":
    main()
