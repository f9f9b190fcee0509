"""Result tables (mean ± std over seeds), paired t-tests against a reference model, and plots."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.table import Table
from scipy import stats

METRICS = [("test", "auc", "AUC", True), ("test", "gauc", "GAUC", True), ("test", "logloss", "LogLoss", False),
           ("test_seen_users", "auc", "AUC seen", True), ("test_seen_users", "gauc", "GAUC seen", True)]


def _by_model(runs: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in runs:
        out[r["model"]][r["seed"]] = r
    return out


def paired_ttest(runs: list[dict], model: str, reference: str, part: str = "test", metric: str = "auc"
                 ) -> tuple[float, float, int]:
    """(mean difference model − reference, two-sided p of a paired t-test over shared seeds, n seeds)."""
    by = _by_model(runs)
    seeds = sorted(set(by[model]) & set(by[reference]))
    a = np.array([by[model][s][part][metric] for s in seeds])
    b = np.array([by[reference][s][part][metric] for s in seeds])
    if len(seeds) < 2 or np.allclose(a, b):
        return float(np.mean(a - b)) if len(seeds) else float("nan"), float("nan"), len(seeds)
    return float(np.mean(a - b)), float(stats.ttest_rel(a, b).pvalue), len(seeds)


def summary_rows(runs: list[dict], reference: str) -> list[dict]:
    rows = []
    for model, per_seed in _by_model(runs).items():
        rs = list(per_seed.values())
        row = {"model": model, "seeds": len(rs)}
        for part, key, label, _ in METRICS:
            v = np.array([r[part][key] for r in rs])
            row[label] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)
        row["train samples/s"] = float(np.mean([r["train_samples_per_s"] for r in rs]))
        row["best epoch"] = float(np.mean([r["best_epoch"] for r in rs]))
        row["params"] = rs[0]["n_params"]
        if model != reference and reference in _by_model(runs):
            d, p, _ = paired_ttest(runs, model, reference)
            row["ΔAUC vs ref"] = d
            row["p"] = p
        rows.append(row)
    return rows


def markdown_table(runs: list[dict], reference: str) -> str:
    rows = summary_rows(runs, reference)
    heads = ["model", "seeds"] + [m[2] for m in METRICS] + ["ΔAUC vs ref", "p", "train samples/s", "best epoch", "params"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [r["model"], str(r["seeds"])]
        cells += [f"{r[m[2]][0]:.4f} ± {r[m[2]][1]:.4f}" for m in METRICS]
        cells.append(f"{r['ΔAUC vs ref']:+.4f}" if "ΔAUC vs ref" in r else "(ref)")
        cells.append(f"{r['p']:.3g}" if "p" in r and not np.isnan(r["p"]) else "")
        cells += [f"{r['train samples/s']:,.0f}", f"{r['best epoch']:.1f}", f"{r['params']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rich_table(runs: list[dict], reference: str, title: str = "") -> Table:
    rows = summary_rows(runs, reference)
    t = Table(title=title)
    for h in ["model", "AUC", "GAUC", "LogLoss", "AUC seen", "ΔAUC", "p", "samples/s"]:
        t.add_column(h, justify="left" if h == "model" else "right")
    for r in rows:
        t.add_row(r["model"], *[f"{r[k][0]:.4f}±{r[k][1]:.4f}" for k in ("AUC", "GAUC", "LogLoss", "AUC seen")],
                  f"{r['ΔAUC vs ref']:+.4f}" if "ΔAUC vs ref" in r else "ref",
                  f"{r['p']:.3g}" if "p" in r and not np.isnan(r["p"]) else "",
                  f"{r['train samples/s']:,.0f}")
    return t


def plot_results(runs: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = _by_model(runs)
    models = list(by)
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.3 * len(models), 4))
    for ax, (key, label) in zip(axes, [("auc", "test AUC"), ("gauc", "test GAUC"), ("logloss", "test LogLoss")]):
        vals = [[r["test"][key] for r in by[m].values()] for m in models]
        means = [np.mean(v) for v in vals]
        ax.bar(range(len(models)), means, yerr=[np.std(v) for v in vals], capsize=3, color="#4c72b0")
        for i, v in enumerate(vals):
            ax.scatter([i] * len(v), v, color="k", s=8, zorder=3)
        lo, hi = min(min(v) for v in vals), max(max(v) for v in vals)
        pad = (hi - lo) * 0.5 + 1e-3
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(range(len(models)), models, rotation=35, ha="right")
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(runs: list[dict], out_dir: Path, reference: str, title: str = "") -> Table:
    md = markdown_table(runs, reference)
    seeds = sorted({r["seed"] for r in runs})
    text = (f"# {title}\n\nSeeds: {seeds}. Mean ± sample std over seeds; p: two-sided paired t-test of test AUC "
            f"against `{reference}` over the same seeds. 'seen' = test rows of users with training events.\n\n"
            f"{md}\n\n![results](results.png)\n")
    (out_dir / "results.md").write_text(text)
    plot_results(runs, out_dir / "results.png", title)
    return rich_table(runs, reference, title)
