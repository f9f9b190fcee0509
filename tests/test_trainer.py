import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sampletok.data.batches import BatchLoader, history_index
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
    lm = b.hist_label_mask.numpy()
    for k, d in enumerate(delays):
        assert np.all(ts[hr[lm[:, :, k]]] + d < req_ts[lm[:, :, k]])
        hidden = m & ~lm[:, :, k]
        assert np.all(b.hist_labels.numpy()[:, :, k][hidden] == 0)
    assert (m & ~lm[:, :, 1]).any()  # the delayed conversion label really is hidden sometimes
    # history features equal the dataset's own rows
    item = np.asarray(ds.col("cat__item_id"))
    assert np.array_equal(b.hist_cat.numpy()[:, :, 0][m], item[hr[m]])


def test_same_seed_same_result_and_training_learns(synth_prepared, tmp_path):
    a = run_model(synth_prepared, ModelSpec(name="dnn"), CFG, seed=5, progress=False)
    b = run_model(synth_prepared, ModelSpec(name="dnn"), CFG, seed=5, progress=False)
    assert a["test"] == b["test"]
    assert a["test"]["auc"] > 0.55  # above chance (0.5) on the planted signal (Bayes optimum 0.84)


def test_killed_run_resumes_to_the_same_result(synth_prepared, tmp_path):
    ds_dir = str(synth_prepared.root)
    script = textwrap.dedent(f"""
        import json, sys
        from sampletok.data.prepare import PreparedDataset
        from sampletok.train.experiment import ModelSpec, run_model
        from sampletok.train.trainer import TrainConfig
        ds = PreparedDataset({ds_dir!r}).load_into_memory()
        cfg = TrainConfig(max_epochs=3, batch_size=256, patience=5)
        r = run_model(ds, ModelSpec(name="din"), cfg, seed=7, run_dir=sys.argv[1], progress=False)
        print(json.dumps(r["test"]))
    """)
    full = subprocess.run([sys.executable, "-c", script, str(tmp_path / "full")], capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "killed")], capture_output=True, text=True,
                            env={**os.environ, "SAMPLETOK_TEST_KILL_AFTER_EPOCH": "2"})
    assert killed.returncode == 137 and (tmp_path / "killed" / "checkpoint.pt").exists()
    resumed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "killed")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == json.loads(full.stdout)
    hist = json.loads((tmp_path / "killed" / "result.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]


def test_early_stopping_and_lr_decay(synth_prepared):
    cfg = TrainConfig(max_epochs=30, batch_size=512, patience=2, lr=3e-3)
    r = run_model(synth_prepared, ModelSpec(name="dnn"), cfg, seed=1, progress=False)
    hist = r["history"]
    assert len(hist) < 30  # stopped early
    best = max(h["valid_auc"] for h in hist)
    assert r["valid"]["auc"] == best and hist[r["best_epoch"] - 1]["valid_auc"] == best
    assert all(h["valid_auc"] <= best for h in hist[r["best_epoch"]:])
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
    cached = {"name": "din", "params": {}, "dataset": "f", "train": old, "requests": None}
    assert _same_run(cached, exp.models[0], TrainConfig(), exp, ds)
    assert not _same_run(cached, exp.models[0], TrainConfig(train_recent_fraction=0.5), exp, ds)
    assert not _same_run({**cached, "dataset": "g"}, exp.models[0], TrainConfig(), exp, ds)
