"""Why does GAUC fall when a model reads past responses? Splits every trained model's test logits into a
per-user level and the within-user deviation (``sampletok.train.metrics.between_within``) and prints, per
model (mean over the seeds that ran): AUC, GAUC, the pooled AUC of the user level alone and of the
deviations alone, and the share of logit variance between users; the last row is the same split of the
labels' own per-user rates (the ceiling of the between-user part).

    python benchmarks/gauc_decomposition.py configs/experiments/kuairand-likes.yaml --out runs/kuairand-likes

Reads the runs `sampletok compare` wrote (model.pt in each run folder); trains nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from sampletok.train.experiment import Experiment, load_dataset, load_trained, run_folder_name
from sampletok.train.metrics import auc, between_within, gauc
from sampletok.train.trainer import predict_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="the compare output folder")
    ap.add_argument("--models", default=None, help="comma-separated labels (default: every model of the config)")
    args = ap.parse_args()
    exp = Experiment.from_yaml(args.config)
    ds = load_dataset(exp.dataset, progress=False).load_into_memory()
    rows = ds.rows("test", where=exp.requests)
    wanted = args.models.split(",") if args.models else [m.display for m in exp.models]
    table = Table(title=f"{exp.name}: what the test logits rank (mean over seeds)")
    heads = ["model", "seeds", "AUC", "GAUC", "AUC of user level", "AUC within user", "var between users"]
    for h in heads:
        table.add_column(h, justify="left" if h == "model" else "right")
    md = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    y = u = None
    for spec in exp.models:
        if spec.display not in wanted:
            continue
        got = []
        for seed in exp.seeds:
            run = args.out / "runs" / run_folder_name(spec.display) / str(seed)
            if not (run / "model.pt").exists():
                continue
            trained = load_trained(ds, run)
            z, y, u = predict_logits(trained.model, trained.loader(ds, rows))
            got.append([auc(y, z), gauc(y, z, u), *between_within(y, z, u).values()])
        if got:
            m = np.nanmean(np.array(got), axis=0)
            cells = [spec.display, str(len(got)), *(f"{v:.4f}" for v in m)]
            table.add_row(*cells)
            md.append("| " + " | ".join(cells) + " |")
    if y is not None and u is not None:
        _, gid = np.unique(u, return_inverse=True)
        rate = (np.bincount(gid, weights=y) / np.bincount(gid))[gid]
        cells = ["(labels' user rate)", "", "", "", f"{auc(y, rate):.4f}", "", ""]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    Console(width=160).print(table)
    print("\n" + "\n".join(md))


if __name__ == "__main__":
    main()
