"""Training throughput of every baseline (and IAT/SIF) on ml-100k under the reference protocol's batch size:
one epoch end to end (batch building, history fetch, forward, backward, Adam), samples per second.

Run on an otherwise idle machine: python benchmarks/bench_train_speed.py ../shared/data/ml-100k [--models dnn,din]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from sampletok.data.batches import BatchLoader, FeatureLayout, history_index
    from sampletok.data.prepare import prepare
    from sampletok.data.sources.movielens import load_movielens
    from sampletok.models import build_model

    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("--models", default="dnn,dcnv2,din,bst,rankmixer,onetrans")
    ap.add_argument("--batches", type=int, default=40)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        src, schema = load_movielens(a.path)
        ds = prepare(src, schema, Path(d) / "ml", progress=False).load_into_memory()
        layout = FeatureLayout.from_dataset(ds)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 1024, history 50")
        print("| model | train samples/s | params |\n|---|---|---|")
        for name in a.models.split(","):
            torch.manual_seed(0)
            model = build_model(name, layout)
            model.prepare_data(ds, seed=0, progress=False)
            opt = torch.optim.Adam(model.parameters(), 1e-3)
            loader = BatchLoader(ds, ds.rows("train"), 1024, shuffle=True, index=history_index(ds), layout=layout)
            it = iter(loader)
            for _ in range(3):  # warm-up
                _step(model, opt, next(it))
            t = time.perf_counter()
            n = 0
            for _ in range(a.batches):
                batch = next(it, None)
                if batch is None:
                    it = iter(loader)
                    batch = next(it)
                _step(model, opt, batch)
                n += len(batch)
            sps = n / (time.perf_counter() - t)
            print(f"| {name} | {sps:,.0f} | {sum(p.numel() for p in model.parameters()):,} |", flush=True)


def _step(model, opt, batch) -> None:
    out = model(batch)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels)
    loss = loss + sum(out.aux_losses.values(), torch.zeros(()))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


if __name__ == "__main__":
    main()
