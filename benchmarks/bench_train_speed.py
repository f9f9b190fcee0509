"""Training throughput of every baseline (and IAT/SIF) on ml-100k under the reference protocol's batch size:
one epoch end to end (batch building, history fetch, forward, backward, Adam), samples per second.

Run on an otherwise idle machine: python benchmarks/bench_train_speed.py ../shared/data/ml-100k [--models dnn,din]
SIF against the OneTrans-style baseline as in configs/experiments/ml100k-sif.yaml:
    python benchmarks/bench_train_speed.py ../shared/data/ml-100k --models din,onetrans,sif --hist-len 20 --batches 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml

# the parameters the experiment configs use (configs/experiments/ml100k-sif.yaml); others take their defaults
MODEL_PARAMS = {"sif": {"hgaq": {"fields_per_token": 4}, "width": 32, "blocks": 2, "heads": 4}}


def main() -> None:
    from sampletok.data.batches import BatchLoader, history_index
    from sampletok.data.prepare import prepare
    from sampletok.data.sources.movielens import load_movielens
    from sampletok.features import FeatureLayout
    from sampletok.models import build_model

    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("--models", default="dnn,dcnv2,din,bst,rankmixer,onetrans")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--hist-len", type=int, default=50)
    ap.add_argument("--params", default=None, help="YAML mapping model → parameters, overriding MODEL_PARAMS")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        src, schema = load_movielens(a.path)
        ds = prepare(src, schema, Path(d) / "ml", progress=False).load_into_memory()
        layout = FeatureLayout.from_dataset(ds)
        params = {**MODEL_PARAMS, **(yaml.safe_load(a.params) if a.params else {})}
        n_train = len(ds.rows("train"))
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 1024, history {a.hist_len}; "
            f"{n_train:,} training rows"
        )
        print("| model | train samples/s | s / epoch | params |\n|---|---|---|---|")
        for name in a.models.split(","):
            torch.manual_seed(0)
            model = build_model(name, layout, **params.get(name, {}))
            opt = torch.optim.Adam(model.parameters(), 1e-3)
            loader = BatchLoader(
                ds,
                ds.rows("train"),
                1024,
                hist_len=a.hist_len,
                shuffle=True,
                index=history_index(ds),
                layout=layout,
                history_samples=model.reads_history_samples,
            )
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
            print(
                f"| {name} | {sps:,.0f} | {n_train / sps:,.1f} | {sum(p.numel() for p in model.parameters()):,} |",
                flush=True,
            )


def _step(model, opt, batch) -> None:
    out = model(batch)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels)
    loss = loss + sum(out.aux_losses.values(), torch.zeros(()))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


if __name__ == "__main__":
    main()
