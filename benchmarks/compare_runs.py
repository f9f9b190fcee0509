"""Bit-identity check of a restructuring: two `sampletok compare` output folders of the same experiment (e.g.
configs/experiments/ml100k-restructure.yaml, run before and after a change) hold the same test and validation
metrics and the same weights, bit for bit.

Run: python benchmarks/compare_runs.py BEFORE AFTER
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

METRIC_KEYS = ("test", "test_seen_users", "test_by_history", "valid", "best_epoch", "epochs", "history", "producer")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    a = ap.parse_args()
    runs = sorted(p.parent.relative_to(a.before) for p in a.before.glob("runs/*/*/result.json"))
    if not runs:
        print(f"error: {a.before}: no runs/*/*/result.json")
        return 2
    bad = 0
    for run in runs:
        r0 = json.loads((a.before / run / "result.json").read_text())
        r1 = json.loads((a.after / run / "result.json").read_text())
        history = [{k: v for k, v in h.items() if not k.endswith("_s") and "per_s" not in k} for h in r0["history"]]
        r0["history"] = history
        r1["history"] = [
            {k: v for k, v in h.items() if not k.endswith("_s") and "per_s" not in k} for h in r1["history"]
        ]
        diffs = [k for k in METRIC_KEYS if r0.get(k) != r1.get(k)]
        w0 = torch.load(a.before / run / "model.pt", weights_only=False)["state_dict"]
        w1 = torch.load(a.after / run / "model.pt", weights_only=False)["state_dict"]
        weights = sorted(k for k in w0 if k not in w1 or not torch.equal(w0[k], w1[k])) + sorted(set(w1) - set(w0))
        same = not diffs and not weights
        bad += not same
        auc = r0["test"]["auc"], r1["test"]["auc"]
        print(
            f"{str(run):28s} test AUC {auc[0]:.6f} → {auc[1]:.6f}  "
            + ("bit-identical (metrics and every weight)" if same else f"DIFFERS: {diffs} weights {weights[:5]}")
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
