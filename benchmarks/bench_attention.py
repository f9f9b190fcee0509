"""Attention kernels on the shapes SIF's mixer runs: forward + backward milliseconds of ``attend`` through each
kernel (``nn/attention.py``), for many short problems of growing key length at a fixed number of keys in all
(so every row costs about the same data), 4 heads of 8 dimensions, a key-padding mask.

Run on an otherwise idle machine: python benchmarks/bench_attention.py [--keys 4,8,16,21,32,48,64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from sampletok.nn.attention import attend, use_attention_kernel

    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", default="4,8,16,21,32,48,64")
    ap.add_argument("--tokens", type=int, default=120_000, help="problems × keys, held fixed across the rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 4 heads × 8 dims, a key-padding mask")
    print("| keys | problems | sdpa ms (fwd + bwd) | short ms | sdpa / short |\n|---|---|---|---|---|")
    for lk in (int(x) for x in a.keys.split(",")):
        n = a.tokens // lk
        q, k, v = (torch.randn(n, 4, lk, 8, requires_grad=True) for _ in range(3))
        mask = torch.ones(n, 1, 1, lk, dtype=torch.bool)
        mask[: n // 2, ..., : lk // 3] = False  # half the rows padded by a third
        ms = {}
        for kernel in ("sdpa", "short"):
            with use_attention_kernel(kernel):
                attend(q, k, v, mask).sum().backward()  # warm-up
                t = time.perf_counter()
                for _ in range(a.repeats):
                    attend(q, k, v, mask).sum().backward()
            ms[kernel] = (time.perf_counter() - t) / a.repeats * 1e3
        print(f"| {lk} | {n:,} | {ms['sdpa']:.1f} | {ms['short']:.1f} | {ms['sdpa'] / ms['short']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
