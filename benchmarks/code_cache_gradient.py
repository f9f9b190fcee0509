"""How much the SIF code cache changes the tokenizer's training signal in one step: the relative L2 difference
of the projection's task-loss (BCE) gradient with and without the cache (same weights, same batch). With the
cache, history rows are decoded from cached codes, so they send no gradient and no EMA update to the
tokenizer; only the request rows do.

Run: python benchmarks/code_cache_gradient.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from sampletok.data.batches import BatchLoader
from sampletok.data.prepare import prepare
from sampletok.data.sources.synthetic import SyntheticConfig, generate_source
from sampletok.features import FeatureLayout
from sampletok.models import build_model

SMALL = dict(hgaq=dict(fields_per_token=4, codes=32), width=16, blocks=2, heads=2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    src, schema = generate_source(SyntheticConfig(n_users=300, n_items=300, events_per_user=40, n_fields=20, seed=3))
    ds = prepare(src, schema, Path(tempfile.mkdtemp()) / "ds", progress=False).load_into_memory()
    rows = ds.rows("train")[-256:]
    batch = BatchLoader(ds, rows, 256, hist_len=12, history_samples=True).build(rows)
    print("| seed | relative L2 difference of the projection's BCE gradient (cache vs none) |\n|---|---|")
    for seed in range(a.seeds):
        grads = []
        for steps in (0, 1000):
            torch.manual_seed(seed)
            model = build_model("sif", FeatureLayout.from_dataset(ds), **SMALL, code_cache_steps=steps).train()
            out = model(batch)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels)
            (g,) = torch.autograd.grad(loss, model.tokenizer.proj)
            grads.append(g)
        print(f"| {seed} | {float((grads[1] - grads[0]).norm() / grads[0].norm()):.3f} |")


if __name__ == "__main__":
    main()
