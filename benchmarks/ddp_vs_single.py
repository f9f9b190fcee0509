"""Pair the runs of one experiment trained in one process and under torchrun (same seeds) and print their test
metrics, the paired differences with two-sided paired t-tests, and the fit times.

    sampletok compare configs/experiments/ml100k-ddp.yaml --out runs/ml100k-ddp-1
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m sampletok.cli compare configs/experiments/ml100k-ddp.yaml \\
        --out runs/ml100k-ddp-2
    python benchmarks/ddp_vs_single.py runs/ml100k-ddp-1 runs/ml100k-ddp-2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("single", type=Path)
    ap.add_argument("ddp", type=Path)
    a = ap.parse_args()
    runs = {k: json.loads((p / "results.json").read_text())["runs"] for k, p in (("1", a.single), ("N", a.ddp))}
    print("| model | processes | seeds | AUC | GAUC | LogLoss | best epoch | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for model in dict.fromkeys(r["model"] for r in runs["1"]):
        by = {k: {r["seed"]: r for r in v if r["model"] == model} for k, v in runs.items()}
        seeds = sorted(set(by["1"]) & set(by["N"]))
        for k in ("1", "N"):
            rs = [by[k][s] for s in seeds]
            cell = {m: np.array([r["test"][m] for r in rs]) for m in ("auc", "gauc", "logloss")}
            print(
                f"| {model} | {rs[0].get('world_size', 1)} | {len(rs)} | "
                + " | ".join(f"{cell[m].mean():.4f} ± {cell[m].std(ddof=1):.4f}" for m in ("auc", "gauc", "logloss"))
                + f" | {np.mean([r['best_epoch'] for r in rs]):.1f} | {np.mean([r['fit_wall_s'] for r in rs]):.1f} |"
            )
        print("\n| model | ΔAUC (DDP − 1) | p | ΔGAUC | p | ΔLogLoss | p |\n|---|---|---|---|---|---|---|")
        deltas = []
        for m in ("auc", "gauc", "logloss"):
            x = np.array([by["N"][s]["test"][m] for s in seeds])
            y = np.array([by["1"][s]["test"][m] for s in seeds])
            deltas.append(f"{(x - y).mean():+.4f} | {stats.ttest_rel(x, y).pvalue:.2f}")
        print(f"| {model} | " + " | ".join(deltas) + " |")


if __name__ == "__main__":
    main()
