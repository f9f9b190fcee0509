import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _cli(*args, cwd=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "sampletok.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


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


def test_a_bad_serving_config_is_one_line(tmp_path):
    r = _cli("serve", "--data", str(tmp_path), "--run", str(tmp_path), "--max-candidates", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "serve" in r.stderr and "max_candidates" in r.stderr, r.stderr


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
    # both methods beside the baselines, each with its distance to the optimum
    assert "## Distance to the optimum" in report
    for model in ("| dnn |", "| din+labels |", "| din+iat-user |", "| sif |"):
        assert report.count(model) >= 2, model  # the results table and the distance table
    assert (tmp_path / "demo" / "results.png").stat().st_size > 10_000


def test_compare_on_ml100k_subset(ml100k_dir, tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"""
name: smoke
dataset: {{kind: movielens, path: {ml100k_dir}, prepared_dir: {tmp_path / "prep"}}}
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
    def result(m, s):
        return tmp_path / "out" / "runs" / m / str(s) / "result.json"

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
    r = _cli(
        "sif",
        "fit",
        "--data",
        str(prep),
        "--out",
        str(run),
        "--epochs",
        "1",
        "--hist-len",
        "6",
        "-p",
        "hgaq={fields_per_token: 8, codes: 16}",
        "-p",
        "width=16",
        "-p",
        "blocks=1",
        "-p",
        "heads=2",
    )
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


# ------------------------------------------------------------------ every user error is one line
def _one_line_error(code: int, stderr: str) -> str:
    """The single stderr line of a failed command (asserting exit code 2, one line, no traceback)."""
    assert code == 2, f"exit code {code}: {stderr[-1500:]}"
    assert "Traceback" not in stderr, stderr[-1500:]
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-1500:]
    return lines[0]


def test_errors_are_one_line_under_a_long_path_and_a_narrow_terminal(tmp_path):
    """rich wraps at the console width (80 columns off a terminal): the error line must not be wrapped."""
    deep = tmp_path / ("a-rather-long-folder-name-" * 6)
    deep.mkdir()
    assert len(str(deep)) >= 120
    log, schema, broken = deep / "log.csv", deep / "schema.yaml", deep / "broken.yaml"
    log.write_text("uid,ts\n1,2\n")
    schema.write_text("name: x\nuser: uid\ntimestamp: ts\nlabels: [{name: y}]\nfeatures: []\n")
    broken.write_text("name: x\nlabels: [{name: y}\n")
    env = {**os.environ, "COLUMNS": "40"}
    cases = [
        (["train", "--data", str(deep / "nothing")], "not a prepared dataset"),
        (["prepare", "--files", str(log), "--schema", str(schema), "--out", str(deep / "o")], "missing columns"),
        (["prepare", "--files", str(log), "--schema", str(broken), "--out", str(deep / "o")], "not valid YAML"),
        (["prepare", "--synthetic", "--out", str(deep / "o"), "--users"], "--users"),  # a usage error
    ]
    for args, needle in cases:
        r = subprocess.run(
            [sys.executable, "-m", "sampletok.cli", *args],
            capture_output=True,
            text=True,
            cwd=deep,
            env=env,
            timeout=600,
        )
        assert needle in _one_line_error(r.returncode, r.stderr)


_MANY = r"""
import contextlib, io, json, sys, traceback
from sampletok.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    sys.argv = ["sampletok", *argv]
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


def _cli_many(cases: list[list[str]], cwd: Path) -> list[tuple[int, str]]:
    """Run many commands through ``sampletok.cli.main`` in one subprocess (one torch import, not one each):
    (exit code, stderr) per command, an escaped exception printed as its traceback."""
    r = subprocess.run(
        [sys.executable, "-c", _MANY, json.dumps(cases)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "40"},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return [tuple(x) for x in json.loads(r.stdout.strip().splitlines()[-1])]


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory):
    from sampletok.data.prepare import prepare
    from sampletok.data.sources.synthetic import SyntheticConfig, generate_source

    src, schema = generate_source(SyntheticConfig(n_users=50, n_items=100, events_per_user=20, n_fields=15, days=20))
    return prepare(src, schema, tmp_path_factory.mktemp("cli") / "syn", progress=False)


def test_bad_options_and_configs_name_what_to_change(small_prepared, tmp_path):
    """Each bad option, parameter or config field ends in one line naming it, never a traceback."""
    import polars as pl
    import torch

    from sampletok.data.prepare import prepare
    from sampletok.data.sources import FrameSource
    from sampletok.schema import Schema
    from tests.conftest import TOY_SCHEMA, toy_frame

    ds = str(small_prepared.root)

    def w(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    schema = w(
        "s.yaml",
        "name: x\nuser: uid\ntimestamp: ts\nlabels: [{name: y}]\n"
        "features: [{name: uid, type: categorical, group: user}]\n",
    )
    log = w("log.csv", "uid,ts,y\n1,2,0\n")

    def exp(name: str, body: str) -> str:
        return w(name, f"dataset: {{kind: prepared, path: {ds}}}\n{body}")

    good = exp("good.yaml", "train: {max_epochs: 1}\nseeds: [1]\nmodels: [{name: dnn, params: {hidden: [8]}}]\n")
    (tmp_path / "noml").mkdir()
    (tmp_path / "noml" / "notes.txt").write_text("keep me")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "manifest.json").write_text("{")
    torch.save({"config": {}, "state_dict": {}, "dataset": small_prepared.fingerprint}, tmp_path / "src.pt")
    # a schema pinning a field to a sub-token the HGAQ grouping does not have; timestamps too wide to index
    df = toy_frame().unique(subset=["uid", "iid", "ts"], keep="first", maintain_order=True)
    feats = [dict(f, sub_token=5) if f["name"] == "iid" else f for f in TOY_SCHEMA["features"]]
    prepare(
        FrameSource(df, "toy"),
        Schema.model_validate({**TOY_SCHEMA, "features": feats}),
        tmp_path / "pinned",
        progress=False,
    )
    prepare(
        FrameSource(df.with_columns(ts=pl.col("ts") * 10**17), "wide"),
        Schema.model_validate(TOY_SCHEMA),
        tmp_path / "wide",
        progress=False,
    )

    def t(*args: str) -> list[str]:
        return ["train", "--data", ds, "--epochs", "1", "--out", str(tmp_path / "run"), *args]

    cases = [  # (command, what the one-line message must name)
        (["prepare", "--synthetic", "--users", "50", "--fields", "8", "--out", "x"], "--fields: ", "(got 8)"),
        (["prepare", "--synthetic", "--users", "0", "--out", "x"], "--users: "),
        (["prepare", "--synthetic", "--schema", schema, "--out", "x"], "--schema"),
        (["prepare", "--movielens", str(tmp_path / "noml"), "--out", "x"], "noml: not a MovieLens folder", "u.data"),
        (["prepare", "--synthetic", "--users", "50", "--fields", "15", "--out", log], "is not a prepared dataset"),
        (
            ["prepare", "--synthetic", "--users", "50", "--fields", "15", "--out", str(tmp_path / "noml")],
            "is not a prepared dataset",
        ),
        (
            ["prepare", "--files", str(tmp_path / "gone.csv"), "--schema", schema, "--out", "x"],
            "gone.csv: file not found",
        ),
        (
            ["prepare", "--files", log, "--schema", w("bad.yaml", "name: x\nlabels: [{name: y}\n"), "--out", "x"],
            "bad.yaml: not valid YAML: line 3",
        ),
        (["prepare", "--files", log, "--schema", w("list.yaml", "- a\n- b\n"), "--out", "x"], "list.yaml", "mapping"),
        (["train", "--data", ds, "--epochs", "0"], "--epochs: ", "(got 0)"),
        (["train", "--data", ds, "--batch-size", "0"], "--batch-size: "),
        (["train", "--data", ds, "--lr", "-1"], "--lr: "),
        (["train", "--data", ds, "--epochs", "many"], "'--epochs'"),
        (["train", "--data", str(tmp_path / "corrupt")], "manifest.json: unreadable manifest"),
        (t("-p", "x=[1"), "--param x: ", "not valid YAML"),
        (t("-p", "hidden"), "--param 'hidden' is not key=value"),
        (t("--model", "dnn", "-p", "hidden=abc"), "model 'dnn': hidden: "),
        (t("--model", "dnn", "-p", "embed_dim=-1"), "model 'dnn'", "embed_dim"),
        (t("--model", "bst", "-p", "heads=3"), "model 'bst'", "heads 3"),
        (t("--model", "rankmixer", "-p", "tokens=3"), "model 'rankmixer'", "token count 3"),
        (t("--model", "sif", "-p", "hgaq={nope: 1}"), "model 'sif': hgaq.nope: "),
        (t("--model", "sif", "-p", "hgaq={fields_per_token: 0}"), "hgaq.fields_per_token: ", "(got 0)"),
        (t("--model", "sif", "-p", "hgaq=5"), "hgaq: "),
        (t("--model", "iat", "-p", "source={nope: 1}"), "model 'iat'", "source.nope: "),
        (t("--model", "iat", "-p", "base_params={hidden: 3}"), "model 'din': hidden: "),
        (
            ["train", "--data", str(tmp_path / "pinned"), "--model", "sif", "--epochs", "1"],
            "pinned to sub-token 5",
            "fields_per_token",
        ),
        (
            [
                "train",
                "--data",
                str(tmp_path / "wide"),
                "--model",
                "dnn",
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "w"),
            ],
            "timestamps: ",
            "rescale the timestamp column",
        ),
        (["evaluate", "--data", ds, "--run", str(tmp_path / "run"), "--split", "nope"], "--split: 'nope'"),
        (["compare", w("syntax.yaml", "name: x\nmodels: [\n")], "syntax.yaml: not valid YAML: line 3"),
        (["compare", w("seq.yaml", "- a\n- b\n")], "seq.yaml: an experiment must be a YAML mapping"),
        (["compare", w("empty.yaml", "")], "empty.yaml", "empty file"),
        (["compare", str(tmp_path)], "cannot read the experiment file"),
        (["compare", exp("noseeds.yaml", "seeds: []\nmodels: [{name: dnn}]\n")], "seeds: "),
        (["compare", exp("nomodels.yaml", "models: []\n")], "models: "),
        (["compare", exp("ref.yaml", "reference: dnnx\nmodels: [{name: dnn}]\n")], "reference 'dnnx'"),
        (
            ["compare", w("split.yaml", "dataset: {kind: synthetic, split: {train: 0.5}}\nmodels: [{name: dnn}]\n")],
            "dataset.split: train + valid + test must be 1",
        ),
        (["compare", w("nopath.yaml", "dataset: {kind: prepared}\nmodels: [{name: dnn}]\n")], "dataset.path"),
        (
            [
                "compare",
                w("syn.yaml", "dataset: {kind: synthetic, synthetic: {n_fields: 3}}\nmodels: [{name: dnn}]\n"),
                "--out",
                str(tmp_path / "c"),
            ],
            "dataset.synthetic.n_fields: ",
        ),
        (["compare", good, "--seeds", "0"], "--seeds: "),
        (["compare", good, "--epochs", "0"], "--epochs: "),
        (["compare", good, "--models", "nope"], "--models: ", "nope"),
        (["iat", "fit-source", "--data", ds, "--out", "s.pt", "-p", "nope=1"], "-p nope: "),
        (["iat", "fit-source", "--data", ds, "--out", "s.pt", "--scheme", "nope"], "--scheme: ", "(got 'nope')"),
        (["iat", "fit-source", "--data", ds, "--out", "s.pt", "-p", "sit_heads=3"], "heads 3"),
        (["iat", "export", "--data", ds, "--model", "gone.pt", "--store", "st"], "--model gone.pt: file not found"),
        (["iat", "export", "--data", ds, "--model", log, "--store", "st"], "not a source model"),
        (
            ["iat", "export", "--data", ds, "--model", str(tmp_path / "src.pt"), "--store", "st", "--dtype", "f8"],
            "--dtype: ",
        ),
        (["sif", "fit", "--data", ds, "--epochs", "0"], "--epochs: "),
        (["sif", "fit", "--data", ds, "--hist-len", "-1"], "--hist-len: "),
        (["sif", "fit", "--data", ds, "--epochs", "1", "-p", "hgaq={codes: 1}"], "hgaq.codes: "),
        (t("--model", "dnn", "-p", "hidden=[4]"), None),  # trains: a dnn run for the next case
        (["sif", "export", "--data", ds, "--run", str(tmp_path / "run"), "--store", "st"], "not a SIF model"),
    ]
    results = _cli_many([c[0] for c in cases], tmp_path)
    failures = []
    for (argv, *needles), (code, err) in zip(cases, results, strict=True):
        try:
            if needles == [None]:
                assert code == 0, err[-1500:]
                continue
            line = _one_line_error(code, err)
            missing = [n for n in needles if n not in line]
            assert not missing, f"{missing} not in {line!r}"
        except AssertionError as e:
            failures.append(f"{' '.join(argv)}\n    {e}")
    assert not failures, "\n".join(failures)
    # prepare --out never replaces a file or a folder that is not a prepared dataset
    assert Path(log).read_text() == "uid,ts,y\n1,2,0\n" and (tmp_path / "noml" / "notes.txt").exists()


def test_train_into_a_folder_of_another_run_is_refused_then_restarted(small_prepared, tmp_path):
    """`train --model dnn --out X` then `--model din --out X`: one line (not a load_state_dict traceback, not
    the old dnn), and --restart trains the din."""
    data, out = str(small_prepared.root), str(tmp_path / "run")
    assert _cli("train", "--data", data, "--model", "dnn", "--epochs", "1", "--out", out).returncode == 0
    r = _cli("train", "--data", data, "--model", "din", "--epochs", "1", "--out", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "checkpoint of another run" in r.stderr and "--restart" in r.stderr
    r = _cli("train", "--data", data, "--model", "din", "--epochs", "1", "--out", out, "--restart")
    assert r.returncode == 0, r.stderr
    assert json.loads((Path(out) / "result.json").read_text())["name"] == "din"
    r = _cli("evaluate", "--data", data, "--run", out)
    assert r.returncode == 0, r.stderr


def test_iat_build_writes_a_causal_store_the_iat_model_reads(small_prepared, tmp_path):
    data, store = str(small_prepared.root), tmp_path / "store"
    src = "{scheme: user, epochs: 1, hidden: [16], decompress: [8], emb_dim: 8, window: 8, folds: 3}"
    params = ["hidden=[16]", "decompress=[8]", "emb_dim=8", "window=8", "folds=3", "epochs=1"]
    r = _cli("iat", "build", "--data", data, "--store", str(store), *[a for p in params for a in ("-p", p)])
    assert r.returncode == 0, r.stderr
    from sampletok.store import LocalTokenStore

    st = LocalTokenStore.open(store)
    assert st.meta["export_order"] == "causal" and len(st) == small_prepared.n_rows
    run_params = [f"store={store}", f"source={src}", "token_len=8"]
    r = _cli(
        "train",
        "--data",
        data,
        "--model",
        "iat",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
        *[a for p in run_params for a in ("-p", p)],
    )
    assert r.returncode == 0, r.stderr
    assert _cli("evaluate", "--data", data, "--run", str(tmp_path / "run")).returncode == 0
