import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _cli(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "sampletok.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_errors_are_one_line_without_traceback(tmp_path):
    r = _cli("train", "--data", str(tmp_path / "nothing"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "not a prepared dataset" in r.stderr
    bad = tmp_path / "log.csv"
    bad.write_text("uid,ts\n1,2\n")
    schema = tmp_path / "s.yaml"
    schema.write_text("name: x\nuser: uid\ntimestamp: ts\nlabels: [{name: y}]\nfeatures: []\n")
    r = _cli("prepare", "--files", str(bad), "--schema", str(schema), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "missing columns ['y']" in r.stderr and "Traceback" not in r.stderr


def test_help_explains_commands():
    r = _cli("--help")
    assert r.returncode == 0
    for cmd in ("prepare", "train", "evaluate", "compare", "demo", "iat"):
        assert cmd in r.stdout


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    r = _cli("demo", "--quick", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr[-2000:]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Bayes-optimal" in report and "din+iat-user" in report
    assert (tmp_path / "demo" / "results.png").stat().st_size > 10_000


def test_compare_on_ml100k_subset(ml100k_dir, tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"""
name: smoke
dataset: {{kind: movielens, path: {ml100k_dir}, prepared_dir: {tmp_path / 'prep'}}}
train: {{max_epochs: 1}}
seeds: [1, 2]
reference: dnn
models: [{{name: dnn}}, {{name: din}}]
""")
    r = _cli("compare", str(cfg), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| din | 2 |" in md and "(ref)" in md
    # A rerun reuses finished runs; a changed model configuration trains that model again, not the others.
    result = lambda m, s: tmp_path / "out" / "runs" / m / str(s) / "result.json"
    before = {m: result(m, 1).stat().st_mtime_ns for m in ("dnn", "din")}
    cfg.write_text(cfg.read_text().replace("{name: dnn}", "{name: dnn, params: {hidden: [32]}}"))
    r = _cli("compare", str(cfg), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert result("din", 1).stat().st_mtime_ns == before["din"]
    assert result("dnn", 1).stat().st_mtime_ns != before["dnn"]
    assert json.loads(result("dnn", 1).read_text())["params"] == {"hidden": [32]}


def test_sif_fit_export_and_codebook_report(tmp_path):
    prep = tmp_path / "syn"
    r = _cli("prepare", "--synthetic", "--users", "120", "--fields", "20", "--out", str(prep))
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "sif"
    r = _cli("sif", "fit", "--data", str(prep), "--out", str(run), "--epochs", "1", "--hist-len", "6",
             "-p", "hgaq={fields_per_token: 8, codes: 16}", "-p", "width=16", "-p", "blocks=1", "-p", "heads=2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("sif", "export", "--data", str(prep), "--run", str(run), "--store", str(tmp_path / "codes"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "instances/s" in r.stdout and "codebook utilization" in r.stdout
    report = json.loads((run / "codebooks.json").read_text())
    assert report["n_codes"] == 16 and 1 <= report["mean_perplexity"] <= 16
    assert (run / "codebooks.png").stat().st_size > 5_000


def test_readme_experiment_example_is_valid():
    import re

    import yaml

    from sampletok.train.experiment import Experiment

    block = re.search(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    exp = Experiment.model_validate(yaml.safe_load(block))
    assert [m.train_config(exp.train).hist_len for m in exp.models] == [20, 20, 20, 50]
