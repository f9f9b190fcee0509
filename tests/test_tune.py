"""`sampletok tune`: equal-budget search on the validation split, resumable studies, declared spaces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from sampletok.data.dataset import PreparedDataset, SplitSpec
from sampletok.data.prepare import prepare
from sampletok.data.sources.synthetic import SyntheticConfig, generate_source
from sampletok.errors import ConfigError, SampletokError
from sampletok.features import FeatureLayout
from sampletok.models import MODELS, build_model
from sampletok.models.base import model_config
from sampletok.train import experiment as experiment_module
from sampletok.train import tune as tune_module
from sampletok.train.experiment import Experiment, ModelSpec
from sampletok.train.trainer import TrainConfig
from sampletok.train.tune import CategoricalSpace, FloatSpace, IntSpace, model_space, search

optuna = pytest.importorskip("optuna")

TINY = SyntheticConfig(n_users=120, n_items=100, events_per_user=20, n_fields=15, days=20, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> PreparedDataset:
    src, schema = generate_source(TINY)
    return prepare(src, schema, tmp_path_factory.mktemp("tiny") / "ds", SplitSpec(), progress=False).load_into_memory()


def experiment(ds: PreparedDataset, models: list[dict], trials: int = 3, **extra) -> Experiment:
    return Experiment.model_validate(
        {
            "name": "tiny",
            "dataset": {"kind": "prepared", "path": str(ds.root)},
            "train": {"max_epochs": 2, "batch_size": 256, "patience": 1},
            "seeds": [1],
            "tune": {"trials": trials},
            "models": models,
            **extra,
        }
    )


DNN = {"name": "dnn", "params": {"hidden": [16]}, "tune": {"only": ["lr", "dropout", "embed_dim"]}}


def trials_of(db) -> list[tuple]:
    """(number, state, params, value) of every trial in a study file."""
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{db}")
    return [(t.number, t.state.name, t.params, t.value) for t in study.get_trials()]


def counted(db) -> list[tuple]:
    """(params, value) of the trials that count toward the budget."""
    return [(p, v) for _, state, p, v in trials_of(db) if state in ("COMPLETE", "PRUNED")]


def same_trials(a: list[tuple], b: list[tuple]) -> bool:
    return [p for p, _ in a] == [p for p, _ in b] and [v for _, v in a] == pytest.approx([v for _, v in b])


# ------------------------------------------------------------------ 1. the test split is never read
def test_the_search_never_reads_the_test_split(tiny, tmp_path, monkeypatch):
    """During the search no test-split row index reaches any loader and ``rows('test')`` is never asked for
    (both would fail if the trials were scored on test, e.g. with evaluate_test=True); the reruns do read it."""
    test_rows = set(tiny.rows("test").tolist())
    valid_rows = set(tiny.rows("valid").tolist())
    assert test_rows and valid_rows
    seen: list[set[int]] = []
    real_rows, real_loader = PreparedDataset.rows, experiment_module.BatchLoader

    def guarded_rows(self, split, *a, **k):
        if split == "test":
            raise AssertionError("the test split was selected during the search")
        return real_rows(self, split, *a, **k)

    class RecordingLoader(real_loader):  # type: ignore[misc, valid-type]
        def __init__(self, ds, rows, *a, **k):
            seen.append(set(np.asarray(rows).tolist()))
            super().__init__(ds, rows, *a, **k)

    monkeypatch.setattr(PreparedDataset, "rows", guarded_rows)
    monkeypatch.setattr(experiment_module, "BatchLoader", RecordingLoader)
    exp = experiment(tiny, [DNN, {"name": "din", "tune": {"only": ["lr", "dropout"]}}], trials=2)
    chosen = search(exp, tmp_path, progress=False, ds=tiny)
    assert [c["model"] for c in chosen] == ["dnn", "din"] and all(c["complete"] == 2 for c in chosen)
    assert len(seen) == 2 * 2 * 2  # 2 models x 2 trials x (train, valid) loaders, nothing else
    assert all(not (rows & test_rows) for rows in seen)
    assert any(rows == valid_rows for rows in seen)  # the trials were scored on the validation split
    # the positive control: the guard does catch a reader of the test split
    with pytest.raises(AssertionError, match="test split"):
        experiment_module.run_model(tiny, ModelSpec(name="dnn"), TrainConfig(max_epochs=1), 1, progress=False)


# ------------------------------------------------------------------ 2. a resumed study ends with the same trials
def test_an_interrupted_tune_resumes_to_the_same_trials(tiny, tmp_path, monkeypatch):
    exp3 = experiment(tiny, [DNN], trials=3)
    search(exp3, tmp_path / "once", progress=False, ds=tiny)
    once = counted(tmp_path / "once" / "tune" / "dnn.db")
    assert len(once) == 3 and len({json.dumps(p, sort_keys=True) for p, _ in once}) == 3

    # 2 trials, then 3: one more trial, the first two unchanged
    search(experiment(tiny, [DNN], trials=2), tmp_path / "grown", progress=False, ds=tiny)
    db = tmp_path / "grown" / "tune" / "dnn.db"
    first = trials_of(db)
    assert len(first) == 2
    search(exp3, tmp_path / "grown", progress=False, ds=tiny)
    assert trials_of(db)[:2] == first and len(trials_of(db)) == 3
    assert same_trials(counted(db), once)

    # interrupted inside the second trial (Ctrl-C), and a trial left RUNNING by a killed process
    real, calls = experiment_module.run_model, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(experiment_module, "run_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search(exp3, tmp_path / "cut", progress=False, ds=tiny)
    monkeypatch.setattr(experiment_module, "run_model", real)
    db = tmp_path / "cut" / "tune" / "dnn.db"
    optuna.load_study(study_name="dnn", storage=f"sqlite:///{db}").ask()  # killed: never told
    assert [s for _, s, _, _ in trials_of(db)] == ["COMPLETE", "FAIL", "RUNNING"]
    chosen = search(exp3, tmp_path / "cut", progress=False, ds=tiny)
    assert same_trials(counted(db), once)  # the interrupted trials did not count: run again, the same
    assert chosen[0]["complete"] == 3 and chosen[0]["failed"] == 0
    assert [s for _, s, _, _ in trials_of(db)] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    # a finished study runs nothing more
    monkeypatch.setattr(experiment_module, "run_model", interrupted)
    search(exp3, tmp_path / "cut", progress=False, ds=tiny)
    assert len(calls) == 2

    # a study written before a training option existed is the same study (the option at its default)
    study = optuna.load_study(study_name="dnn", storage=f"sqlite:///{db}")
    fingerprint = study.user_attrs["fingerprint"]
    del fingerprint["train"]["validations_per_epoch"]
    study.set_user_attr("fingerprint", fingerprint)
    search(exp3, tmp_path / "cut", progress=False, ds=tiny)
    assert len(calls) == 2

    # a study of another configuration is refused in one line, not mixed in
    other = experiment(tiny, [{**DNN, "params": {"hidden": [8]}}], trials=3)
    with pytest.raises(ConfigError, match="a study of another configuration.*params") as e:
        search(other, tmp_path / "cut", progress=False, ds=tiny)
    assert "\n" not in str(e.value)


def test_the_pruner_reads_each_epochs_validation_score(tiny, tmp_path):
    """Every trial reports its validation monitor after each epoch; a complete trial's value is its best epoch's
    score, a pruned one stopped early, its best score below the median of the earlier complete trials."""
    exp = experiment(tiny, [DNN], trials=6, tune={"trials": 6, "prune_startup": 1, "prune_warmup": 0})
    exp = exp.model_copy(update={"train": exp.train.model_copy(update={"max_epochs": 3, "patience": 3})})
    chosen = search(exp, tmp_path, progress=False, ds=tiny)
    study = optuna.load_study(study_name="dnn", storage=f"sqlite:///{tmp_path / 'tune' / 'dnn.db'}")
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert chosen[0]["pruned"] == len(pruned) >= 1 and chosen[0]["complete"] + len(pruned) == 6
    for t in study.trials:
        if t.state.name == "COMPLETE":
            assert sorted(t.intermediate_values) == [1, 2, 3]
            assert t.value == pytest.approx(max(t.intermediate_values.values()))
        else:
            step = max(t.intermediate_values)
            assert step < 3
            done = [u.intermediate_values[step] for u in study.trials[: t.number] if u.state.name == "COMPLETE"]
            assert max(t.intermediate_values.values()) < np.median(done)  # its best so far, below the median


# ------------------------------------------------------------------ 3. a bad search space is one line
def _space(space) -> dict:
    return {"name": "din", "tune": {"space": space}}


F01 = {"kind": "float", "low": 0.0, "high": 0.1}


@pytest.mark.parametrize(
    "model, top, message",
    [
        (_space({"nope": F01}), {}, "unknown parameter 'nope' (model din takes"),
        (_space({"dropout": {"kind": "float", "low": 0.5, "high": 0.1}}), {}, "dropout: low 0.5 is above high 0.1"),
        (_space({"dropout": {"kind": "int", "low": 3, "high": 1}}), {}, "dropout: low 3 is above high 1"),
        (_space({"dropout": {"kind": "beta", "low": 0, "high": 1}}), {}, "does not match any of the expected tags"),
        (_space({"dropout": {"low": 0, "high": 1}}), {}, "dropout: Unable to extract tag using discriminator 'kind'"),
        (_space({"embed_dim": {"kind": "categorical", "choices": []}}), {}, "embed_dim.choices: List should have"),
        (_space({"embed_dim": {"kind": "categorical", "choices": [8, 8]}}), {}, "choices must be distinct"),
        (_space({"lr": {"kind": "float", "low": 0, "high": 0.1, "log": True}}), {}, "log-scaled space needs low > 0"),
        (_space({"lr": F01}), {}, "tune space: lr: Input should be greater than 0 (got 0.0)"),
        (_space({"embed_dim": {"kind": "categorical", "choices": ["wide"]}}), {}, "embed_dim = 'wide'"),
        (_space({"dropout": {"kind": "float", "low": 0, "high": 1, "step": 2}}), {}, "dropout.step: Extra inputs"),
        ({"name": "sif", "tune": {"space": {"hgaq.nope": F01}}}, {}, "unknown field of hgaq 'hgaq.nope'"),
        ({"name": "sif", "tune": {"space": {"hgaq.codes": {"kind": "int", "low": 1, "high": 8}}}}, {}, "codes"),
        ({"name": "din", "tune": {"only": ["lr", "blocks"]}}, {}, "tune.only: blocks not in its space"),
        ({"name": "din", "tune": {"only": ["lr"], "space": {"lr": None}}}, {}, "tune.only: lr not in its space"),
        ({"name": "din", "tune": {"nope": 1}}, {}, "models.0.tune.nope: Extra inputs are not permitted"),
        ({"name": "din"}, {"tune": {"trials": 0}}, "tune.trials: Input should be greater than or equal to 1"),
        ({"name": "din"}, {"tune": {"metric": {"ndcg": 1}}}, "tune.metric: metric weights must be among"),
        ({"name": "din"}, {"tune": {"pruner": "hyperband"}}, "tune.pruner: Input should be 'median' or 'none'"),
    ],
)
def test_a_bad_search_space_is_one_config_error_line(model, top, message, tmp_path, tiny):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"name": "bad", "dataset": {"kind": "prepared", "path": str(tiny.root)}, "models": [model], **top}
        )
    )
    with pytest.raises(ConfigError) as e:
        search(Experiment.from_yaml(cfg), tmp_path / "out", progress=False, ds=tiny)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()  # failed before any study was made


def test_the_cli_prints_a_bad_space_as_one_line(tmp_path):
    from tests.test_cli import _cli, _one_line_error

    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        "dataset: {kind: synthetic}\nmodels: [{name: sif, tune: {space: {blocks: {kind: int, low: 4, high: 1}}}}]\n"
    )
    r = _cli("tune", str(cfg), "--trials", "2", "--out", str(tmp_path / "out"))
    line = _one_line_error(r.returncode, r.stderr)
    assert "models.0.tune.space: blocks: low 4 is above high 1" in line, line
    cfg.write_text("dataset: {kind: synthetic}\nmodels: [{name: sif}]\n")
    r = _cli("tune", str(cfg), "--trials", "0")
    assert "--trials: must be at least 1" in _one_line_error(r.returncode, r.stderr)


def test_without_optuna_the_error_names_the_extra(tiny, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    with pytest.raises(SampletokError, match=r"pip install 'sampletok\[tune\]'"):
        search(experiment(tiny, [DNN]), tmp_path, progress=False, ds=tiny)


# ------------------------------------------------------------------ 4. every model declares a valid space
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_declares_a_valid_search_space(name):
    cls = MODELS[name]
    assert "search_space" in vars(cls), f"{name} declares no search_space of its own"
    space = cls.search_space
    train_keys = set(TrainConfig.model_fields)
    assert isinstance(space["lr"], FloatSpace) and space["lr"].log and "weight_decay" in space
    params = model_config(name, {})["params"]
    assert not set(params) & train_keys  # a key is a train setting or a model parameter, never both
    model_keys = [k for k in space if k not in train_keys]
    assert model_keys, f"{name} searches no parameter of its own"
    for key in model_keys:  # every key names an existing (sub-)parameter: a renamed one fails here
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{name}: {key} is not a parameter"
            node = node[part]
    assert list(model_space(ModelSpec(name=name))) == list(space)  # checks every range end against the model
    layout = FeatureLayout.example()
    for key in model_keys:  # the model builds at each end of each range
        s = space[key]
        ends = s.choices if isinstance(s, CategoricalSpace) else [s.low, s.high]
        assert isinstance(s, (CategoricalSpace, IntSpace, FloatSpace))
        for v in ends:
            build_model(name, layout, **tune_module.with_values({}, {key: v}))


# ------------------------------------------------------------------ 5. the CLI end to end
def test_cli_tune_end_to_end(tiny, tmp_path):
    from typer.testing import CliRunner

    from sampletok.cli import app

    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "dataset": {"kind": "prepared", "path": str(tiny.root)},
                "train": {"max_epochs": 1, "batch_size": 256},
                "seeds": [1, 2],
                "tune": {"trials": 5, "metric": {"auc": 1.0}},
                "models": [DNN, {"name": "din", "label": "din-small", "params": {"embed_dim": 8}}],
            }
        )
    )
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["tune", str(cfg), "--trials", "2", "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "2 trials per model" in r.output and "din-small" in r.output
    tune_dir = out / "tune"
    summary = json.loads((tune_dir / "tuned.json").read_text())
    assert summary["trials_per_model"] == 2 and summary["metric"] == {"auc": 1.0}
    dnn, din = summary["models"]
    assert set(dnn["values"]) == {"lr", "dropout", "embed_dim"}
    assert "embed_dim" not in din["values"] and {"lr", "weight_decay", "hidden", "dropout"} == set(din["values"])
    for m in (dnn, din):
        assert m["complete"] + m["pruned"] + m["failed"] == 2 and np.isfinite(m["valid_score"])
        assert 0 < m["test_mean"]["auc"] < 1
    assert len(trials_of(tune_dir / "dnn.db")) == len(trials_of(tune_dir / "din-small.db")) == 2
    report = (tune_dir / "report.md").read_text()
    assert "Budget: 2 trials per model" in report and "| din-small | 2 |" in report and "ΔAUC vs ref" in report
    # the tuned experiment: the chosen values in each spec, the metric as its monitor; compare reruns it and
    # finds every run done (the same configuration), the tuned rows of results.json are these
    tuned = Experiment.from_yaml(tune_dir / "tuned.yaml")
    assert tuned.train.monitor == {"auc": 1.0} and tuned.seeds == [1, 2]
    assert tuned.models[0].params == {
        "hidden": [16],
        "embed_dim": dnn["values"]["embed_dim"],
        "dropout": pytest.approx(dnn["values"]["dropout"]),
    }
    assert tuned.models[1].train == {"lr": din["values"]["lr"], "weight_decay": din["values"]["weight_decay"]}
    done = [tune_dir / "tuned" / "runs" / m / str(s) / "result.json" for m in ("dnn", "din-small") for s in (1, 2)]
    stamps = [p.stat().st_mtime_ns for p in done]
    runs = experiment_module.compare(tuned, tune_dir / "tuned", progress=False, ds=tiny)
    assert len(runs) == 4 and [p.stat().st_mtime_ns for p in done] == stamps
    # a second tune finds everything done: the same chosen values
    r = CliRunner().invoke(app, ["tune", str(cfg), "--trials", "2", "--out", str(out)])
    assert (
        r.exit_code == 0 and json.loads((tune_dir / "tuned.json").read_text())["models"][0]["values"] == dnn["values"]
    )


def test_every_shipped_experiment_can_be_tuned():
    """Each model of each experiment under configs/experiments has a valid space (its fixed params removed),
    except in an experiment that fixes every model's values (e.g. ml100k-long, the tuned values at several L):
    there each model is the one-line "nothing to tune" error, never a partly tunable experiment."""
    from tests.conftest import REPO

    for path in sorted((REPO / "configs" / "experiments").glob("*.yaml")):
        exp = Experiment.from_yaml(path)
        fixed = []
        for spec in exp.models:
            try:
                assert model_space(spec, exp.train.model_dump()), (path.name, spec.display)
            except ConfigError as e:
                assert "empty search space" in str(e) and "\n" not in str(e), (path.name, str(e))
                fixed.append(spec.display)
        assert not fixed or len(fixed) == len(exp.models), (path.name, "fixes only", fixed)
