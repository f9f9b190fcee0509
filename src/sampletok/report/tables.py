"""Result tables (mean ± std over seeds), paired t-tests against a reference model, and plots."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table
from scipy import stats

from sampletok.errors import ConfigError

METRICS = [
    ("test", "auc", "AUC", True),
    ("test", "gauc", "GAUC", True),
    ("test", "logloss", "LogLoss", False),
    ("test_seen_users", "auc", "AUC seen", True),
    ("test_seen_users", "gauc", "GAUC seen", True),
]


def _by_model(runs: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in runs:
        out[r["model"]][r["seed"]] = r
    return out


def _part(run: dict, part: str) -> dict:
    """``run[part]``; a path like ``test_by_history/<10`` reads nested parts."""
    for key in part.split("/"):
        run = run[key]
    return run


def paired_ttest(
    runs: list[dict], model: str, reference: str, part: str = "test", metric: str = "auc"
) -> tuple[float, float, int]:
    """(mean difference model − reference, two-sided p of a paired t-test over shared seeds, n seeds)."""
    by = _by_model(runs)
    seeds = sorted(set(by[model]) & set(by[reference]))
    a = np.array([_part(by[model][s], part)[metric] for s in seeds])
    b = np.array([_part(by[reference][s], part)[metric] for s in seeds])
    if len(seeds) < 2 or np.allclose(a, b):
        return float(np.mean(a - b)) if len(seeds) else float("nan"), float("nan"), len(seeds)
    return float(np.mean(a - b)), float(stats.ttest_rel(a, b).pvalue), len(seeds)


# A paired t-test over n seeds has n − 1 degrees of freedom: with 2 seeds (1 d.o.f.) a small p says little, so
# such rows are never bolded and carry a mark instead.
MIN_SEEDS = 3
ALPHA = 0.05
INDICATIVE = "†"
INDICATIVE_NOTE = f"{INDICATIVE} fewer than {MIN_SEEDS} paired seeds: indicative only"


def significant(p: float, n: int) -> bool:
    """Whether a paired difference is shown as significant: p < 0.05 over at least 3 paired seeds."""
    return n >= MIN_SEEDS and not np.isnan(p) and p < ALPHA


def _bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


def _fmt_p(p: float) -> str:
    return "" if np.isnan(p) else f"{p:.3g}"


def summary_rows(runs: list[dict], reference: str) -> list[dict]:
    """Per model: mean and sample std of every metric over its seeds, speed, and (for models other than the
    reference) the paired t-test of every metric against the reference over the shared seeds."""
    by = _by_model(runs)
    rows = []
    for model, per_seed in by.items():
        rs = list(per_seed.values())
        row: dict[str, Any] = {"model": model, "seeds": len(rs), "tests": {}}
        for part, key, label, _ in METRICS:
            v = np.array([r[part][key] for r in rs])
            row[label] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)
            if model != reference and reference in by:
                row["tests"][label] = paired_ttest(runs, model, reference, part, key)
        row["train samples/s"] = float(np.mean([r["train_samples_per_s"] for r in rs]))
        row["best epoch"] = float(np.mean([r["best_epoch"] for r in rs]))
        row["params"] = rs[0]["n_params"]
        if row["tests"]:
            d, p, n = row["tests"]["AUC"]
            row["ΔAUC vs ref"], row["p"], row["paired seeds"] = d, p, n
        rows.append(row)
    return rows


def _best_significant(rows: list[dict]) -> set[tuple[str, str]]:
    """(model, metric label) cells to bold: the best mean of the column, when that model differs from the
    reference on that metric significantly (p < 0.05 over >= 3 paired seeds)."""
    out = set()
    for _, _, label, higher in METRICS:
        best = max(rows, key=lambda r: r[label][0] if higher else -r[label][0], default=None)
        if best is not None and label in best["tests"]:
            _, p, n = best["tests"][label]
            if significant(p, n):
                out.add((best["model"], label))
    return out


def markdown_table(runs: list[dict], reference: str) -> str:
    """The summary as markdown. Bold: a column's best mean when significantly different from the reference,
    and ΔAUC/p when significant (p < 0.05, >= 3 paired seeds); rows with fewer paired seeds are marked †."""
    rows = summary_rows(runs, reference)
    bold = _best_significant(rows)
    heads = (
        ["model", "seeds"] + [m[2] for m in METRICS] + ["ΔAUC vs ref", "p", "train samples/s", "best epoch", "params"]
    )
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    marked = False
    for r in rows:
        cells = [r["model"], str(r["seeds"])]
        cells += [_bold(f"{r[m[2]][0]:.4f} ± {r[m[2]][1]:.4f}", (r["model"], m[2]) in bold) for m in METRICS]
        if "ΔAUC vs ref" in r:
            sig = significant(r["p"], r["paired seeds"])
            few = r["paired seeds"] < MIN_SEEDS
            marked |= few
            cells.append(_bold(f"{r['ΔAUC vs ref']:+.4f}", sig))
            cells.append(_bold(_fmt_p(r["p"]), sig) + (INDICATIVE if few else ""))
        else:
            cells += ["(ref)", ""]
        cells += [f"{r['train samples/s']:,.0f}", f"{r['best epoch']:.1f}", f"{r['params']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    if marked:
        lines += ["", INDICATIVE_NOTE]
    return "\n".join(lines)


def rich_table(runs: list[dict], reference: str, title: str = "") -> Table:
    rows = summary_rows(runs, reference)
    t = Table(title=title)
    for h in ["model", "AUC", "GAUC", "LogLoss", "AUC seen", "ΔAUC", "p", "samples/s"]:
        t.add_column(h, justify="left" if h == "model" else "right")
    for r in rows:
        few = "ΔAUC vs ref" in r and r["paired seeds"] < MIN_SEEDS
        t.add_row(
            r["model"],
            *[f"{r[k][0]:.4f}±{r[k][1]:.4f}" for k in ("AUC", "GAUC", "LogLoss", "AUC seen")],
            f"{r['ΔAUC vs ref']:+.4f}" if "ΔAUC vs ref" in r else "ref",
            (_fmt_p(r["p"]) if "p" in r else "") + (INDICATIVE if few else ""),
            f"{r['train samples/s']:,.0f}",
        )
    if any("ΔAUC vs ref" in r and r["paired seeds"] < MIN_SEEDS for r in rows):
        t.caption = INDICATIVE_NOTE
    return t


# ------------------------------------------------------------------ pairwise comparisons over shared seeds
PAIRWISE_METRICS = [("auc", "AUC", True), ("gauc", "GAUC", True), ("logloss", "LogLoss", False)]


def load_results(paths: Sequence[str | Path]) -> list[dict]:
    """The runs of one or more ``results.json`` files written by ``compare`` (a directory or the file itself),
    merged. A (label, seed) in two files must be the same run (same test metrics); anything else is an error."""
    runs: dict[tuple[str, int], tuple[dict, Path]] = {}
    for given in paths:
        path = Path(given)
        path = path / "results.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"{given}: no results.json (run `sampletok compare` with --out there first)")
        try:
            data = json.loads(path.read_text())
            file_runs = data["runs"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a results.json written by compare ({type(e).__name__}: {e})") from None
        for r in file_runs:
            key = (r["model"], int(r["seed"]))
            if key in runs and not _same_results(runs[key][0], r):
                raise ConfigError(
                    f"run '{key[0]}' seed {key[1]} has different results in {runs[key][1]} and "
                    f"{path}: give the runs distinct labels"
                )
            runs.setdefault(key, (r, path))
    datasets = {r["dataset"] for r, _ in runs.values() if "dataset" in r}
    if len(datasets) > 1:
        raise ConfigError(f"results of different prepared datasets {sorted(datasets)} cannot be paired")
    return [r for r, _ in runs.values()]


def _same_results(a: dict, b: dict) -> bool:
    return all(a.get(part) == b.get(part) for part in ("test", "test_seen_users", "valid"))


SPLITS = ("test", "valid")


def pairwise_rows(
    runs: list[dict],
    reference: str,
    against: list[str] | None = None,
    metric: str | None = None,
    split: str = "test",
) -> list[dict]:
    """Each model (``against``, default every other) vs ``reference``, paired over their shared seeds: n and,
    per metric, (mean Δ model − reference, two-sided paired-t p). ``metric`` orders the rows by its Δ, best
    first (default: the order of the runs). ``split``: ``test`` or ``valid`` (the best epoch's validation
    figures: what to choose a model or an option by, without reading the test split)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'; use test or valid")
    labels = list(_by_model(runs))
    unknown = [m for m in [reference, *(against or [])] if m not in labels]
    if unknown:
        raise ConfigError(
            f"no runs labelled {', '.join(repr(m) for m in unknown)}; the results have: {', '.join(labels)}"
        )
    if metric is not None and metric not in {k for k, _, _ in PAIRWISE_METRICS}:
        raise ConfigError(f"unknown metric '{metric}'; use one of auc, gauc, logloss")
    rows = []
    for model in against or [m for m in labels if m != reference]:
        row: dict = {"model": model}
        for key, label, _ in PAIRWISE_METRICS:
            d, p, n = paired_ttest(runs, model, reference, split, key)
            row[label], row["n"] = (d, p), n
        rows.append(row)
    if metric is not None:
        label, higher = next((lab, h) for k, lab, h in PAIRWISE_METRICS if k == metric)
        rows.sort(key=lambda r: (np.isnan(r[label][0]), -r[label][0] if higher else r[label][0]))
    return rows


def pairwise_table(
    runs: list[dict],
    reference: str,
    against: list[str] | None = None,
    metric: str | None = None,
    split: str = "test",
) -> str:
    """Markdown of :func:`pairwise_rows`: Δ and p bold when significant (p < 0.05 over >= 3 paired seeds);
    rows with fewer paired seeds are marked † after every p and explained under the table."""
    rows = pairwise_rows(runs, reference, against, metric, split)
    heads = ["comparison", "seeds"] + [h for _, lab, _ in PAIRWISE_METRICS for h in (f"Δ{lab}", "p")]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        few = r["n"] < MIN_SEEDS
        cells = [f"{r['model']} − {reference}", str(r["n"])]
        for _, label, _ in PAIRWISE_METRICS:
            d, p = r[label]
            sig = significant(p, r["n"])
            cells += [
                _bold("" if np.isnan(d) else f"{d:+.4f}", sig),
                _bold(_fmt_p(p), sig) + (INDICATIVE if few else ""),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r["n"] < MIN_SEEDS for r in rows):
        lines += ["", INDICATIVE_NOTE]
    return "\n".join(lines)


def pairwise_rich(
    runs: list[dict],
    reference: str,
    against: list[str] | None = None,
    metric: str | None = None,
    title: str = "",
    split: str = "test",
) -> Table:
    """The same comparison as :func:`pairwise_table`, as a rich table for the terminal."""
    t = Table(title=title)
    for h in ["comparison", "seeds"] + [h for _, lab, _ in PAIRWISE_METRICS for h in (f"Δ{lab}", "p")]:
        t.add_column(h, justify="left" if h == "comparison" else "right")
    rows = pairwise_rows(runs, reference, against, metric, split)
    for r in rows:
        few = INDICATIVE if r["n"] < MIN_SEEDS else ""
        cells = [f"{r['model']} − {reference}", str(r["n"])]
        for _, label, _ in PAIRWISE_METRICS:
            d, p = r[label]
            style = "bold" if significant(p, r["n"]) else ""
            cells += [
                f"[{style}]{d:+.4f}[/]" if style else ("" if np.isnan(d) else f"{d:+.4f}"),
                (f"[{style}]{_fmt_p(p)}[/]" if style else _fmt_p(p)) + few,
            ]
        t.add_row(*cells)
    if any(r["n"] < MIN_SEEDS for r in rows):
        t.caption = INDICATIVE_NOTE
    return t


def history_bucket_table(runs: list[dict], reference: str, against: list[str] | None = None) -> str:
    """Markdown: per history-length bucket of the test requests (``test_by_history``), each model's mean AUC
    and its paired ΔAUC (and p) against ``reference``; the header gives each bucket's rows ("n/a": no AUC, the
    bucket's rows are all of one class)."""
    by = _by_model(runs)
    with_buckets = [r for r in runs if r.get("test_by_history")]
    if not with_buckets:
        raise ConfigError("these results have no test_by_history (run them again with this version of compare)")
    buckets = list(with_buckets[0]["test_by_history"])
    sizes = {b: with_buckets[0]["test_by_history"][b]["n"] for b in buckets}
    heads = ["model", "seeds"] + [f"{b} past events ({sizes[b]:,} rows): AUC, ΔAUC, p" for b in buckets]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    models = [reference, *(against or [m for m in by if m != reference])]
    for model in models:
        cells = [model, str(len(by[model]))]
        for b in buckets:
            part = f"test_by_history/{b}"
            auc = np.mean([_part(r, part).get("auc", np.nan) for r in by[model].values()])
            if np.isnan(auc):  # an empty bucket, or one whose rows are all of one class
                cells.append("n/a")
                continue
            if model == reference:
                cells.append(f"{auc:.4f}, ref")
                continue
            d, p, n = paired_ttest(runs, model, reference, part, "auc")
            sig = significant(p, n)
            mark = INDICATIVE if n < MIN_SEEDS else ""
            cells.append(f"{auc:.4f}, {_bold(f'{d:+.4f}', sig)}, {_bold(_fmt_p(p), sig)}{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(runs: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = _by_model(runs)
    models = list(by)
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.3 * len(models), 4))
    panels = [("auc", "test AUC"), ("gauc", "test GAUC"), ("logloss", "test LogLoss")]
    for ax, (key, label) in zip(axes, panels, strict=True):
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


def source_table(runs: list[dict]) -> str:
    """The IAT source models' own validation quality beside what the ranking model made of their tokens (test
    AUC), mean over seeds; empty when no run read IAT tokens.

    Example:
        >>> runs = [{"model": "iat", "seed": s, "source_valid": {"auc": 0.70 + s / 100, "logloss": 0.6, "rows": 9},
        ...          "test": {"auc": 0.74}} for s in (1, 2)]
        >>> print(source_table(runs).splitlines()[-1])
        | iat | 2 | 0.7150 | 0.6000 | 0.7400 |
    """
    rows = []
    for model, by_seed in _by_model(runs).items():
        got = [r for r in by_seed.values() if r.get("source_valid")]
        if not got:
            continue
        src_auc = float(np.mean([r["source_valid"]["auc"] for r in got]))
        src_ll = float(np.mean([r["source_valid"]["logloss"] for r in got]))
        test = [r["test"]["auc"] for r in got if "test" in r]
        test_auc = f"{np.mean(test):.4f}" if test else "-"
        rows.append(f"| {model} | {len(got)} | {src_auc:.4f} | {src_ll:.4f} | {test_auc} |")
    if not rows:
        return ""
    head = (
        "IAT source models (their own first-label prediction on the validation split, mean over seeds):\n\n"
        "| model | seeds | source valid AUC | source valid LogLoss | ranking test AUC |\n|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(rows)


def write_report(runs: list[dict], out_dir: Path, reference: str, title: str = "") -> Table:
    md = markdown_table(runs, reference)
    seeds = sorted({r["seed"] for r in runs})
    text = (
        f"# {title}\n\nSeeds: {seeds}. Mean ± sample std over seeds; p: two-sided paired t-test of test AUC "
        f"against `{reference}` over the same seeds. 'seen' = test rows of users with training events. "
        f"Bold: significant against the reference (p < {ALPHA} over >= {MIN_SEEDS} paired seeds; for a "
        f"metric column, the best mean of the column).\n\n"
        f"{md}\n\n![results](results.png)\n"
    )
    source = source_table(runs)
    if source:
        text += f"\n{source}\n"
    (out_dir / "results.md").write_text(text)
    plot_results(runs, out_dir / "results.png", title)
    return rich_table(runs, reference, title)
