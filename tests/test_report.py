"""Result tables: significance is only claimed over >= 3 paired seeds, and `sampletok report`'s pairwise
comparisons equal an independent paired t-test over the seeds both models ran."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from sampletok.errors import ConfigError
from sampletok.report.tables import INDICATIVE_NOTE, load_results, pairwise_rows, pairwise_table, write_report


def _run(model: str, seed: int, auc: float, gauc: float = 0.7, logloss: float = 0.6) -> dict:
    """A run dict as `compare` writes it (only the fields the report reads)."""
    return {
        "model": model,
        "seed": seed,
        "test": {"auc": auc, "gauc": gauc, "logloss": logloss},
        "test_seen_users": {"auc": auc, "gauc": gauc, "logloss": logloss},
        "valid": {"auc": auc},
        "train_samples_per_s": 1000.0,
        "best_epoch": 1,
        "n_params": 10,
        "dataset": "fp",
    }


def _row(md: str, label: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"| {label} |"))


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _runs_two_and_three_seeds(two_best: bool) -> list[dict]:
    """ref over seeds 1-3; 'two' beats it on seeds 1-2 only, 'three' on all three; both consistently, so both
    paired p are < 0.05. ``two_best``: 'two' has the best AUC of the table (else 'three')."""
    base = {1: 0.70, 2: 0.71, 3: 0.72}
    lift_two, lift_three = (0.05, 0.02) if two_best else (0.02, 0.05)
    runs = [_run("ref", s, a) for s, a in base.items()]
    runs += [_run("two", s, base[s] + lift_two + 1e-4 * s) for s in (1, 2)]
    runs += [_run("three", s, base[s] + lift_three + 1e-4 * s * s) for s in (1, 2, 3)]
    return runs


@pytest.mark.parametrize("two_best", [True, False])
def test_report_never_bolds_rows_with_fewer_than_three_paired_seeds(tmp_path, two_best):
    runs = _runs_two_and_three_seeds(two_best)
    p_two = stats.ttest_rel([r["test"]["auc"] for r in runs if r["model"] == "two"], [0.70, 0.71]).pvalue
    assert p_two < 0.05  # significant by the test, yet only 1 degree of freedom
    write_report(runs, tmp_path, reference="ref", title="t")
    md = (tmp_path / "results.md").read_text()
    two, three = _row(md, "two"), _row(md, "three")
    heads = _cells(next(line for line in md.splitlines() if line.startswith("| model |")))
    p_col = heads.index("p")
    assert "**" not in two, two
    assert _cells(two)[p_col].endswith("†")
    assert INDICATIVE_NOTE in md and md.index(INDICATIVE_NOTE) > md.index(two)  # the footnote under the table
    c3 = _cells(three)
    assert c3[p_col].startswith("**") and not c3[p_col].endswith("†"), three
    assert c3[heads.index("ΔAUC vs ref")].startswith("**")
    # the AUC column's best mean is bolded only when its row has >= 3 paired seeds
    assert c3[heads.index("AUC")].startswith("**") == (not two_best)


def test_report_without_short_rows_has_no_footnote(tmp_path):
    runs = [r for r in _runs_two_and_three_seeds(False) if r["model"] != "two"]
    write_report(runs, tmp_path, reference="ref", title="t")
    md = (tmp_path / "results.md").read_text()
    assert "†" not in md


def _random_runs(seed: int = 0) -> list[dict]:
    """ref over seeds 1-5, 'a' over 1-4, 'b' over 3-5 plus seed 9 (not run by ref), 'c' over seeds 1-2."""
    rng = np.random.default_rng(seed)
    seeds = {"ref": [1, 2, 3, 4, 5], "a": [1, 2, 3, 4], "b": [3, 4, 5, 9], "c": [1, 2]}
    return [_run(m, s, *rng.uniform([0.6, 0.6, 0.5], [0.8, 0.8, 0.7])) for m, ss in seeds.items() for s in ss]


def test_pairwise_values_equal_scipy_paired_ttest_over_shared_seeds():
    runs = _random_runs()
    value = {(r["model"], r["seed"], k): v for r in runs for k, v in r["test"].items()}
    rows = {r["model"]: r for r in pairwise_rows(runs, "ref")}
    md = pairwise_table(runs, "ref")
    assert set(rows) == {"a", "b", "c"}
    for model, shared in [("a", [1, 2, 3, 4]), ("b", [3, 4, 5]), ("c", [1, 2])]:
        assert rows[model]["n"] == len(shared)
        cells = _cells(_row(md, f"{model} − ref"))
        assert cells[1] == str(len(shared))
        for i, (key, label) in enumerate([("auc", "AUC"), ("gauc", "GAUC"), ("logloss", "LogLoss")]):
            a = np.array([value[model, s, key] for s in shared])
            b = np.array([value["ref", s, key] for s in shared])
            expected = stats.ttest_rel(a, b)
            d, p = rows[model][label]
            assert d == pytest.approx(float(np.mean(a - b)), abs=1e-12)
            assert p == pytest.approx(float(expected.pvalue), rel=1e-9)
            delta_cell, p_cell = cells[2 + 2 * i].strip("*"), cells[3 + 2 * i]
            assert float(delta_cell) == pytest.approx(np.mean(a - b), abs=5e-5)
            assert float(p_cell.strip("*†")) == pytest.approx(expected.pvalue, rel=5e-3)
            assert p_cell.endswith("†") == (len(shared) < 3)
            assert p_cell.startswith("**") == (len(shared) >= 3 and expected.pvalue < 0.05)
    assert INDICATIVE_NOTE in md


def test_pairwise_against_and_metric_order():
    runs = _random_runs()
    rows = pairwise_rows(runs, "ref", against=["c", "a"])
    assert [r["model"] for r in rows] == ["c", "a"]
    by_ll = pairwise_rows(runs, "ref", metric="logloss")
    lls = [r["LogLoss"][0] for r in by_ll]
    assert lls == sorted(lls)  # lower LogLoss is better: best (most negative Δ) first
    by_auc = pairwise_rows(runs, "ref", metric="auc")
    aucs = [r["AUC"][0] for r in by_auc]
    assert aucs == sorted(aucs, reverse=True)


def test_pairwise_on_the_validation_split_reads_only_validation_figures(tmp_path):
    """``split="valid"`` (``report --split valid``): the same paired table over each run's best-epoch
    validation figures, so options are chosen without the test split; the test figures never enter it."""
    rng = np.random.default_rng(3)
    runs = _random_runs()
    for r in runs:
        r["valid"] = dict(zip(("auc", "gauc", "logloss"), rng.uniform([0.6, 0.6, 0.5], [0.8, 0.8, 0.7]), strict=True))
    value = {(r["model"], r["seed"]): r["valid"]["auc"] for r in runs}
    rows = {r["model"]: r for r in pairwise_rows(runs, "ref", split="valid")}
    a = np.array([value["a", s] for s in (1, 2, 3, 4)]) - np.array([value["ref", s] for s in (1, 2, 3, 4)])
    assert rows["a"]["AUC"][0] == pytest.approx(float(a.mean()), abs=1e-12)
    assert rows["a"]["AUC"][0] != pytest.approx(pairwise_rows(runs, "ref")[0]["AUC"][0], abs=1e-6)
    for r in runs:
        r["test"] = {k: float("nan") for k in r["test"]}
    assert pairwise_rows(runs, "ref", split="valid") == list(rows.values())
    with pytest.raises(ConfigError, match="unknown split 'train'"):
        pairwise_rows(runs, "ref", split="train")
    d = _write(tmp_path / "v", runs)
    r = _cli("report", str(d), "--reference", "ref", "--split", "valid")
    assert r.returncode == 0, r.stderr
    text = (d / "pairwise-ref-valid.md").read_text()
    assert text.startswith("Validation metrics") and pairwise_table(runs, "ref", split="valid") in text


@pytest.mark.parametrize("reference,against", [("nope", None), ("ref", ["a", "nope"])])
def test_pairwise_unknown_label_is_a_config_error(reference, against):
    with pytest.raises(ConfigError, match="no runs labelled 'nope'"):
        pairwise_table(_random_runs(), reference, against)


def _write(d, runs: list[dict]):
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps({"experiment": {}, "dataset": "x", "runs": runs}))
    return d


def test_load_results_merges_directories_and_refuses_conflicting_runs(tmp_path):
    runs = _random_runs()
    ref = [r for r in runs if r["model"] == "ref"]
    d1 = _write(tmp_path / "one", ref + [r for r in runs if r["model"] == "a"])
    d2 = _write(tmp_path / "two", ref + [r for r in runs if r["model"] in ("b", "c")])  # the same ref runs
    merged = load_results([d1, d2])
    assert len(merged) == len(runs)
    assert pairwise_table(merged, "ref") == pairwise_table(runs, "ref")
    changed = [dict(r, test={**r["test"], "auc": 0.5}) if r["seed"] == 2 else r for r in ref]
    d3 = _write(tmp_path / "three", changed)
    with pytest.raises(ConfigError, match=r"run 'ref' seed 2 has different results in .*one.* and .*three"):
        load_results([d1, d3])
    with pytest.raises(ConfigError, match="no results.json"):
        load_results([tmp_path / "missing"])


def _cli(*args):
    # a wide console, so the printed table's cells are not truncated (errors are one line at any width)
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "sampletok.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_report_command_prints_and_writes_markdown_and_errors_in_one_line(tmp_path):
    runs = _random_runs()
    ref = [r for r in runs if r["model"] == "ref"]
    d1 = _write(tmp_path / "one", ref + [r for r in runs if r["model"] == "a"])
    d2 = _write(tmp_path / "two", ref + [r for r in runs if r["model"] == "b"])
    r = _cli("report", str(d1), str(d2), "--reference", "ref", "--metric", "gauc")
    assert r.returncode == 0, r.stderr
    assert "a − ref" in r.stdout and "b − ref" in r.stdout
    md = (d1 / "pairwise-ref.md").read_text()
    assert pairwise_table(load_results([d1, d2]), "ref", metric="gauc") in md
    # chosen rows go to a file of their own: the reference's full table stays
    r = _cli("report", str(d1), str(d2), "--reference", "ref", "--against", "b")
    assert r.returncode == 0, r.stderr
    assert "b − ref" in (d1 / "pairwise-ref-vs-b.md").read_text()
    assert (d1 / "pairwise-ref.md").read_text() == md
    for args, message in [
        (["--reference", "nope"], "no runs labelled 'nope'"),
        (["--reference", "ref", "--against", "zz"], "no runs labelled 'zz'"),
    ]:
        r = _cli("report", str(d1), *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli("report", str(tmp_path / "missing"), "--reference", "ref")
    assert r.returncode == 2 and "no results.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("report", str(d1), "--reference", "ref", "--out", str(tmp_path / "no" / "such" / "dir" / "x.md"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_history_buckets_pair_per_bucket_and_mark_one_class_buckets():
    from sampletok.report.tables import history_bucket_table

    def with_buckets(run: dict, short: float, long: float) -> dict:
        return {**run, "test_by_history": {"<10": {"n": 4}, "10-50": {"auc": short, "n": 30},
                                           ">=50": {"auc": long, "n": 60}}}  # fmt: skip

    ref = [with_buckets(_run("ref", s, 0.7), 0.60 + 0.01 * s, 0.80 + 0.01 * s) for s in (1, 2, 3)]
    new = [with_buckets(_run("new", s, 0.7), 0.61 + 0.01 * s + 1e-3 * s * s, 0.90 + 0.012 * s) for s in (1, 2, 3)]
    md = history_bucket_table(ref + new, "ref")
    assert "10-50 past events (30 rows)" in md and ">=50 past events (60 rows)" in md
    cells = _cells(_row(md, "new"))
    assert cells[2] == "n/a"  # no AUC in a bucket whose rows are all of one class
    want = stats.ttest_rel([0.61 + 0.01 * s + 1e-3 * s * s for s in (1, 2, 3)], [0.60 + 0.01 * s for s in (1, 2, 3)])
    auc, delta, p = (c.strip("* ") for c in cells[3].split(","))
    assert float(delta) == pytest.approx(0.01 + 1e-3 * 14 / 3, abs=1e-4) and float(p) == pytest.approx(
        want.pvalue, rel=1e-2
    )


def test_run_reports_test_metrics_per_history_bucket(synth_prepared):
    from sampletok.data.batches import history_index
    from sampletok.train.experiment import ModelSpec, run_model
    from sampletok.train.metrics import auc
    from sampletok.train.trainer import TrainConfig

    cfg = TrainConfig(max_epochs=1, batch_size=512, hist_len=5, history_buckets=[10, 30])
    r = run_model(synth_prepared, ModelSpec(name="dnn"), cfg, seed=0, progress=False)
    parts = r["test_by_history"]
    assert list(parts) == ["<10", "10-30", ">=30"]
    assert sum(p["n"] for p in parts.values()) == r["test"]["n"]
    rows = synth_prepared.rows("test")
    past = history_index(synth_prepared).count_before(
        np.asarray(synth_prepared.col("_user_key"))[rows], np.asarray(synth_prepared.col("_ts"))[rows]
    )
    assert parts[">=30"]["n"] == int((past >= 30).sum()) and parts["<10"]["n"] == int((past < 10).sum())
    assert 0.0 <= parts[">=30"]["auc"] <= 1.0 and auc is not None
