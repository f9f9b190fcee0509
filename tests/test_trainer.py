import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from sampletok.data.batches import BatchLoader
from sampletok.errors import ConfigError
from sampletok.train.experiment import ModelSpec, run_model
from sampletok.train.trainer import TrainConfig

CFG = TrainConfig(max_epochs=3, batch_size=256, patience=5, lr=3e-3)


def test_batches_never_leak(synth_prepared):
    """Every history row of every request is strictly earlier, of the same user, and labels respect delays."""
    ds = synth_prepared
    rows = ds.rows("test")
    b = BatchLoader(ds, rows, len(rows)).build(rows)
    ts, user = np.asarray(ds.col("_ts")), np.asarray(ds.col("_user_key"))
    m = b.hist_mask.numpy()
    hr = b.hist_rows.numpy()
    req_ts = np.broadcast_to(b.ts.numpy()[:, None], hr.shape)
    assert m.any()
    assert np.all(ts[hr[m]] < req_ts[m])
    assert np.all(user[hr[m]] == np.broadcast_to(b.user.numpy()[:, None], hr.shape)[m])
    delays = np.array([l.delay for l in ds.schema.labels])
    lm = b.hist_response_mask.numpy()
    for k, d in enumerate(delays):
        assert np.all(ts[hr[lm[:, :, k]]] + d < req_ts[lm[:, :, k]])
        hidden = m & ~lm[:, :, k]
        assert np.all(b.hist_responses.numpy()[:, :, k][hidden] == 0)
    assert (m & ~lm[:, :, 1]).any()  # the delayed conversion label really is hidden sometimes
    # history features equal the dataset's own rows
    item = np.asarray(ds.col("cat__item_id"))
    assert np.array_equal(b.hist_cat.numpy()[:, :, 0][m], item[hr[m]])


def test_same_seed_same_result_and_training_learns(synth_prepared, tmp_path):
    a = run_model(synth_prepared, ModelSpec(name="dnn"), CFG, seed=5, progress=False)
    b = run_model(synth_prepared, ModelSpec(name="dnn"), CFG, seed=5, progress=False)
    assert a["test"] == b["test"]
    assert a["test"]["auc"] > 0.55  # above chance (0.5) on the planted signal (Bayes optimum 0.84)


@pytest.mark.parametrize("validations", [1, 3])
def test_killed_run_resumes_to_the_same_result(synth_prepared, tmp_path, validations):
    """Killed after epoch 2's checkpoint, a run resumes to the same result (with validations inside each
    epoch too: the resumed run redoes them from the epoch's checkpoint)."""
    ds_dir = str(synth_prepared.root)
    script = textwrap.dedent(f"""
        import json, os, sys
        from sampletok.data.dataset import PreparedDataset
        from sampletok.train.experiment import ModelSpec, run_model
        from sampletok.train.trainer import TrainConfig
        ds = PreparedDataset({ds_dir!r}).load_into_memory()
        cfg = TrainConfig(max_epochs=3, batch_size=256, patience=5, validations_per_epoch={validations})
        kill_after = int(sys.argv[2]) if len(sys.argv) > 2 else 0
        crash = lambda epoch: os._exit(137) if epoch == kill_after else None  # a real crash, after a checkpoint
        r = run_model(ds, ModelSpec(name="din"), cfg, seed=7, run_dir=sys.argv[1], progress=False,
                      on_epoch_end=crash)
        print(json.dumps(r["test"]))
    """)
    full = subprocess.run([sys.executable, "-c", script, str(tmp_path / "full")], capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    killed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "killed"), "2"], capture_output=True, text=True
    )
    assert killed.returncode == 137 and (tmp_path / "killed" / "checkpoint.pt").exists()
    resumed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "killed")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == json.loads(full.stdout)
    hist = json.loads((tmp_path / "killed" / "result.json").read_text())["history"]
    full_hist = json.loads((tmp_path / "full" / "result.json").read_text())["history"]
    epochs = [h["epoch"] for h in hist]
    assert epochs == [h["epoch"] for h in full_hist] and len(epochs) == 3 * validations
    assert epochs[validations - 1 :: validations] == [1, 2, 3] and epochs == sorted(epochs)
    assert [h["valid_monitor"] for h in hist] == [h["valid_monitor"] for h in full_hist]


def test_early_stopping_and_lr_decay(synth_prepared):
    cfg = TrainConfig(max_epochs=30, batch_size=512, patience=2, lr=3e-3)
    r = run_model(synth_prepared, ModelSpec(name="dnn"), cfg, seed=1, progress=False)
    hist = r["history"]
    assert len(hist) < 30  # stopped early
    best = max(h["valid_monitor"] for h in hist)
    assert hist[r["best_epoch"] - 1]["valid_monitor"] == best
    assert r["valid"]["auc"] - r["valid"]["logloss"] == pytest.approx(best)  # the default monitor
    assert all(h["valid_monitor"] <= best for h in hist[r["best_epoch"] :])
    lrs = [h["lr"] for h in hist]
    assert min(lrs) < lrs[0]


def test_per_model_train_overrides_are_validated_and_recorded():
    base = TrainConfig(hist_len=20, max_epochs=3)
    spec = ModelSpec(name="sif", label="sif-L50", train={"hist_len": 50})
    assert spec.train_config(base).hist_len == 50 and spec.train_config(base).max_epochs == 3
    assert base.hist_len == 20 and ModelSpec(name="din").train_config(base) is base
    with pytest.raises(ConfigError, match="sif-L50: invalid train override: hist_len"):
        ModelSpec(name="sif", label="sif-L50", train={"hist_len": "long"}).train_config(base)
    with pytest.raises(ConfigError, match="invalid train override: no_such_option"):
        ModelSpec(name="sif", train={"no_such_option": 1}).train_config(base)


def test_recent_rows_keeps_the_latest_requests(synth_prepared):
    from sampletok.train.experiment import recent_rows

    ds = synth_prepared
    rows = ds.rows("train")
    assert recent_rows(rows, None) is rows
    kept = recent_rows(rows, 0.1)
    ts = np.asarray(ds.col("_ts"))
    assert len(kept) == int(np.ceil(0.1 * len(rows)))
    assert ts[kept].min() >= ts[np.setdiff1d(rows, kept)].max()  # nothing older is kept over something newer
    assert np.all(np.diff(ts[kept]) >= 0)
    assert len(recent_rows(rows, 1.0)) == len(rows)


def test_finished_runs_made_before_a_new_train_option_are_reused():
    from types import SimpleNamespace

    from sampletok.train.experiment import Experiment, _same_run

    exp = Experiment.model_validate({"dataset": {"kind": "synthetic"}, "models": [{"name": "din"}]})
    ds = SimpleNamespace(fingerprint="f")
    old = TrainConfig().model_dump(mode="json")
    del old["train_recent_fraction"]  # a result.json written before the option existed
    cached = {"name": "din", "params": {}, "dataset": "f", "train": old, "requests": None, "monitor": {"auc": 1}}
    assert _same_run(cached, exp.models[0], TrainConfig(), exp, ds)
    # a run from before the correctness round (AUC-only stopping, in-sample IAT) is never reused
    assert not _same_run({k: v for k, v in cached.items() if k != "monitor"}, exp.models[0], TrainConfig(), exp, ds)
    assert not _same_run(cached, exp.models[0], TrainConfig(train_recent_fraction=0.5), exp, ds)
    assert not _same_run({**cached, "dataset": "g"}, exp.models[0], TrainConfig(), exp, ds)


def test_checkpoint_of_another_run_is_refused_or_restarted(synth_prepared, tmp_path):
    """`train --model dnn --out X` then `--model din --out X` must not resume (or return) the dnn."""
    cfg = TrainConfig(max_epochs=1, batch_size=512)
    run_model(synth_prepared, ModelSpec(name="dnn"), cfg, seed=1, run_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="checkpoint of another run .*model: 'dnn' there, 'din' now"):
        run_model(synth_prepared, ModelSpec(name="din"), cfg, seed=1, run_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="seed: 1 there, 2 now"):
        run_model(synth_prepared, ModelSpec(name="dnn"), cfg, seed=2, run_dir=tmp_path, progress=False)
    r = run_model(synth_prepared, ModelSpec(name="din"), cfg, seed=1, run_dir=tmp_path, progress=False, resume=False)
    assert r["name"] == "din" and json.loads((tmp_path / "result.json").read_text())["name"] == "din"
    assert not list(tmp_path.glob(".*tmp-*"))  # atomic writes leave no temporaries


def test_a_checkpoint_written_before_a_new_train_option_resumes(synth_prepared, tmp_path):
    """A checkpoint whose fingerprint lacks a training option added since matches a run at that option's
    default (the field is compared validated), and a run that sets the option otherwise is refused."""
    cfg = TrainConfig(max_epochs=2, batch_size=512)
    run_model(synth_prepared, ModelSpec(name="dnn"), cfg, seed=1, run_dir=tmp_path, progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    saved = torch.load(ckpt, weights_only=False)
    for field in ("validations_per_epoch", "train_recent_fraction"):
        del saved["fingerprint"]["train"][field]
    torch.save(saved, ckpt)
    trained: list[int] = []
    again = run_model(
        synth_prepared,
        ModelSpec(name="dnn"),
        cfg,
        seed=1,
        run_dir=tmp_path,
        progress=False,
        on_epoch_end=trained.append,
    )
    assert again["epochs"] == 2 and trained == []  # resumed at its end: nothing trained again
    with pytest.raises(ConfigError, match="checkpoint of another run .*validations_per_epoch"):
        run_model(
            synth_prepared,
            ModelSpec(name="dnn"),
            cfg.model_copy(update={"validations_per_epoch": 2}),
            seed=1,
            run_dir=tmp_path,
            progress=False,
        )


def _fit_with_scores(synth_prepared, scores, monitor, rows=512, run_dir=None, **train):
    """fit() with the validation metrics of each validation scripted (the model still trains for real)."""
    from unittest import mock

    from sampletok.features import FeatureLayout
    from sampletok.models import build_model
    from sampletok.train import trainer

    ds = synth_prepared
    model = build_model("dnn", FeatureLayout.from_dataset(ds))
    loader = BatchLoader(ds, ds.rows("train")[:rows], 512)
    it = iter(scores)
    steps: list[int] = []
    cfg = TrainConfig(**{"max_epochs": len(scores), "patience": 10, "monitor": monitor, **train})
    with mock.patch.object(trainer, "evaluate", lambda m, l: dict(next(it), n=1)):
        r = trainer.fit(
            model,
            loader,
            loader,
            cfg,
            seed=0,
            progress=False,
            run_dir=run_dir,
            fingerprint={"run": "scripted"} if run_dir else None,
            on_validation=lambda step, score: steps.append(step),
        )
    r.steps = steps  # type: ignore[attr-defined]
    return r


def test_combined_monitor_keeps_the_calibrated_epoch(synth_prepared):
    """The DIN-on-KuaiRand pattern: AUC creeps up while LogLoss explodes after epoch 1."""
    scores = [
        {"auc": 0.912, "gauc": 0.7, "logloss": 0.29},
        {"auc": 0.918, "gauc": 0.7, "logloss": 1.67},
        {"auc": 0.927, "gauc": 0.7, "logloss": 1.9},
    ]
    assert _fit_with_scores(synth_prepared, scores, {"auc": 1.0}).best_epoch == 3
    assert _fit_with_scores(synth_prepared, scores, {"auc": 1.0, "logloss": -1.0}).best_epoch == 1
    with pytest.raises(Exception, match="monitor metrics must be among"):
        TrainConfig(monitor={"acc": 1})


def test_nan_validation_metric_stops_and_never_silently_returns_the_last_epoch(synth_prepared):
    from sampletok.errors import TrainingError

    nan = float("nan")
    ok = {"auc": 0.7, "gauc": 0.6, "logloss": 0.5}
    r = _fit_with_scores(synth_prepared, [ok, {**ok, "logloss": nan}, ok], {"auc": 1.0, "logloss": -1.0})
    assert r.best_epoch == 1 and len(r.history) == 2 and "NaN at epoch 2" in r.stopped
    with pytest.raises(TrainingError, match="no epoch had a finite validation monitor"):
        _fit_with_scores(synth_prepared, [{**ok, "auc": nan}] * 2, {"auc": 1.0})


def test_oov_replacement_trains_the_oov_row_only_in_training(synth_prepared):
    ds = synth_prepared
    rows = ds.rows("train")[:2000]
    plain = BatchLoader(ds, rows, 2000, hist_len=10)
    noisy = BatchLoader(ds, rows, 2000, hist_len=10, oov_rate=0.1, shuffle=False)
    a, b = plain.build(rows), next(iter(noisy))
    lay = plain.layout
    oov = np.array([lay.vocab_sizes[f.name] - 1 for f in lay.cat_fields])
    true_cat = np.array([f.type.value == "categorical" for f in lay.cat_fields])
    changed = (a.cat != b.cat).numpy()
    assert np.all(b.cat.numpy()[changed] == np.broadcast_to(oov, changed.shape)[changed])
    assert 0.07 < changed[:, true_cat].mean() < 0.13 and not changed[:, ~true_cat].any()
    hist_changed = (a.hist_cat != b.hist_cat).numpy()
    assert hist_changed.any() and not (hist_changed & ~a.hist_mask.numpy()[:, :, None]).any()  # padding stays 0
    # same epoch → same replacement (resumable); build() and evaluation loaders never replace
    np.testing.assert_array_equal(next(iter(noisy)).cat.numpy(), b.cat.numpy())
    assert torch.equal(noisy.build(rows).cat, a.cat)
    # the OOV row of the user field receives gradient
    from sampletok.models import build_model

    model = build_model("dnn", lay)
    out = model(b).logits.sum()
    out.backward()
    assert model.embed.tables["user_id"].weight.grad[lay.vocab_sizes["user_id"] - 1].abs().sum() > 0


def test_frozen_embeddings_stay_put_while_the_rest_trains(synth_prepared):
    from sampletok.features import FeatureLayout
    from sampletok.models import build_model
    from sampletok.train.trainer import fit

    ds = synth_prepared
    model = build_model("dnn", FeatureLayout.from_dataset(ds))
    loader = BatchLoader(ds, ds.rows("train")[:1024], 256, shuffle=True)
    cfg = TrainConfig(max_epochs=2, patience=5, freeze_embeddings_after=1, monitor={"auc": 1})
    snapshots = []
    fit(
        model,
        loader,
        loader,
        cfg,
        seed=0,
        progress=False,
        on_epoch_end=lambda e: snapshots.append({k: v.clone() for k, v in model.state_dict().items()}),
    )
    emb = [k for k in snapshots[0] if k.startswith("embed.tables")]
    other = [k for k in snapshots[0] if not k.startswith("embed.") and snapshots[0][k].is_floating_point()]
    assert emb and all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in emb)
    assert any(not torch.equal(snapshots[0][k], snapshots[1][k]) for k in other)


@pytest.mark.parametrize("overconfidence", [5.0, 60.0])
def test_platt_calibration_lowers_logloss_and_keeps_ranking(synth_prepared, overconfidence):
    """A model whose logits are `overconfidence`× too large (60×: near-saturated, where plain Newton steps
    diverged) is recalibrated to the LogLoss optimum without reordering its scores."""
    from sampletok.features import FeatureLayout
    from sampletok.models import build_model
    from sampletok.train import trainer as _tr
    from sampletok.train.metrics import all_metrics, logloss
    from sampletok.train.trainer import fit, predict, predict_logits

    fit_calibration = _tr.fit_calibration

    ds = synth_prepared
    model = build_model("dnn", FeatureLayout.from_dataset(ds))
    train = BatchLoader(ds, ds.rows("train"), 512, shuffle=True)
    fit(model, train, BatchLoader(ds, ds.rows("valid"), 4096), TrainConfig(max_epochs=1), seed=0, progress=False)
    model.eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight *= overconfidence
        head.bias *= overconfidence
    loader = BatchLoader(ds, ds.rows("valid"), 4096)
    p0, y, u = predict(model, loader)
    a, b = fit_calibration(model, loader)
    p1, _, _ = predict(model, loader)
    m0, m1 = all_metrics(y, p0, u), all_metrics(y, p1, u)
    assert m1["logloss"] < m0["logloss"] and m1["logloss"] < 0.7
    assert m1["auc"] == pytest.approx(m0["auc"], abs=1e-9) and m1["gauc"] == pytest.approx(m0["gauc"], abs=1e-9)
    # the optimum: no (a, b) on a grid around it does better
    z, _, _ = predict_logits(model, loader)
    best = logloss(y, p1)
    for da in (0.9, 1.1):
        for db in (-0.1, 0.1):
            assert logloss(y, 1 / (1 + np.exp(-(a * da * z + b + db)))) >= best - 1e-9


def test_a_diverged_model_never_wins_early_stopping(synth_prepared):
    """NaN scores through the real predict path: all metrics NaN, so training fails instead of keeping it."""
    from sampletok.errors import TrainingError
    from sampletok.features import FeatureLayout
    from sampletok.models import build_model
    from sampletok.train.metrics import all_metrics
    from sampletok.train.trainer import fit

    y, u = np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])
    assert all(np.isnan(v) for k, v in all_metrics(y, np.array([0.1, np.nan, 0.2, 0.9]), u).items() if k != "n")
    ds = synth_prepared
    model = build_model("dnn", FeatureLayout.from_dataset(ds))
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.bias.fill_(float("nan"))
    loader = BatchLoader(ds, ds.rows("train")[:512], 512)
    with pytest.raises(TrainingError, match="no epoch had a finite validation monitor"):
        fit(model, loader, loader, TrainConfig(max_epochs=2, monitor={"auc": 1}), seed=0, progress=False)


def test_a_saved_model_carries_its_full_config_and_an_older_one_names_the_fix(synth_prepared, tmp_path):
    from sampletok.atomic import save_torch
    from sampletok.train.experiment import load_trained

    cfg = CFG.model_copy(update={"max_epochs": 1})
    run_model(
        synth_prepared, ModelSpec(name="din", params={"embed_dim": 8}), cfg, seed=1, run_dir=tmp_path, progress=False
    )
    saved = torch.load(tmp_path / "model.pt", weights_only=False)
    assert saved["config"]["name"] == "din"
    assert saved["config"]["params"]["embed_dim"] == 8 and saved["config"]["params"]["hidden"] == [256, 128, 64]
    trained = load_trained(synth_prepared, tmp_path)
    for k, v in saved["state_dict"].items():
        assert torch.equal(trained.model.state_dict()[k], v), k
    # a model saved before configs were kept: a one-line error, never a model built from today's defaults
    old = {k: v for k, v in saved.items() if k != "config"} | {"name": "din", "params": {"embed_dim": 8}}
    save_torch(old, tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="older sampletok, without the model's config; train the model again"):
        load_trained(synth_prepared, tmp_path)


def test_validations_within_an_epoch_stop_where_the_first_pass_peaks(synth_prepared, tmp_path):
    """4 batches an epoch, 4 validations: the peak after the first batch is kept, the run stops inside epoch 1
    once patience (counted in validations) runs out, the lr decays per bad validation, and a resume from the
    checkpoint written at the stop trains no further."""
    s = lambda auc: {"auc": auc, "gauc": 0.5, "logloss": 0.5}  # noqa: E731
    scores = [s(0.70), s(0.69), s(0.68), s(0.9)]  # the last would be better, but patience ends the run first
    r = _fit_with_scores(
        synth_prepared, scores, {"auc": 1.0}, rows=2048, run_dir=tmp_path, patience=2, validations_per_epoch=4
    )
    assert [h["epoch"] for h in r.history] == [0.25, 0.5, 0.75]
    assert r.best_epoch == 0.25 and r.best_valid["auc"] == 0.70 and r.steps == [1, 2, 3]
    assert [h["lr"] for h in r.history] == pytest.approx([1e-3, 1e-3, 1e-4])  # lr logged before each decay
    again = _fit_with_scores(
        synth_prepared, [], {"auc": 1.0}, rows=2048, run_dir=tmp_path, patience=2, validations_per_epoch=4, max_epochs=1
    )
    assert again.history == r.history and again.best_epoch == 0.25 and again.steps == []
    # no stop: every epoch ends on a validation at its last batch, the pruner's steps count validations
    full = _fit_with_scores(synth_prepared, [s(0.6 + i / 100) for i in range(4)], {"auc": 1.0}, rows=2048,
                            validations_per_epoch=2, max_epochs=2)  # fmt: skip
    assert (
        [h["epoch"] for h in full.history] == [0.5, 1, 1.5, 2] and full.best_epoch == 2 and full.steps == [1, 2, 3, 4]
    )
    # more validations than batches: one per batch
    few = _fit_with_scores(synth_prepared, [s(0.6)] * 4, {"auc": 1.0}, rows=1024, validations_per_epoch=5, max_epochs=2)
    assert [h["epoch"] for h in few.history] == [0.5, 1, 1.5, 2]


def test_a_training_split_without_batches_is_one_error_not_an_endless_loop(synth_prepared):
    from sampletok.errors import TrainingError
    from sampletok.features import FeatureLayout
    from sampletok.models import build_model
    from sampletok.train import trainer

    ds = synth_prepared
    model = build_model("dnn", FeatureLayout.from_dataset(ds))
    empty = BatchLoader(ds, ds.rows("train")[:0], 512)
    valid = BatchLoader(ds, ds.rows("valid")[:512], 512)
    with pytest.raises(TrainingError, match="no batch"):
        trainer.fit(model, empty, valid, TrainConfig(max_epochs=2), seed=0, progress=False)


def test_compare_reuses_a_linked_run_folder_and_never_replaces_it(synth_prepared, tmp_path):
    """Pairing with another experiment's runs by linking its run folder: the runs are reused when the
    configurations agree, and a configuration that differs is one error, not a retrain over the other's runs."""
    from sampletok.train.experiment import Experiment, compare

    def exp(lr: float) -> Experiment:
        return Experiment.model_validate(
            {
                "dataset": {"kind": "synthetic"},
                "models": [{"name": "dnn"}],
                "seeds": [1],
                "train": {"max_epochs": 1, "batch_size": 512, "lr": lr},
            }  # fmt: skip
        )

    first = compare(exp(1e-3), tmp_path / "a", progress=False, ds=synth_prepared)
    theirs = tmp_path / "a" / "runs" / "dnn" / "1" / "result.json"
    before = theirs.read_text()
    (tmp_path / "b" / "runs").mkdir(parents=True)
    (tmp_path / "b" / "runs" / "dnn").symlink_to(tmp_path / "a" / "runs" / "dnn")
    again = compare(exp(1e-3), tmp_path / "b", progress=False, ds=synth_prepared)
    assert again[0]["test"] == first[0]["test"]
    with pytest.raises(ConfigError, match="linked to .*another configuration") as e:
        compare(exp(2e-3), tmp_path / "b", progress=False, ds=synth_prepared)
    assert "\n" not in str(e.value) and theirs.read_text() == before
    # a folder of its own is retrained under a new configuration, as before
    compare(exp(1e-3), tmp_path / "c", progress=False, ds=synth_prepared)
    changed = compare(exp(2e-3), tmp_path / "c", progress=False, ds=synth_prepared)
    assert changed[0]["train"]["lr"] == 2e-3
