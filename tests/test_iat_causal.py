"""The time-causal IAT export (no training-window token was made by parameters that saw a later label) and the
producer check of saved IAT runs."""

import shutil

import numpy as np
import pytest
import torch

from sampletok.data.dataset import PreparedDataset
from sampletok.errors import StoreError
from sampletok.tokenizers.iat import IATSourceConfig
from sampletok.tokens.iat import causal_embeddings, embed_all, fold_of_rows
from sampletok.tokens.iat_source import train_source
from sampletok.train.experiment import ModelSpec, load_trained, run_model
from sampletok.train.trainer import TrainConfig

FAST = dict(epochs=1, hidden=[32], decompress=[16], emb_dim=8, window=16, batch_size=256, dtype="float32")


def _with_later_labels_flipped(ds: PreparedDataset, t_cut: int, delay: int = 0) -> PreparedDataset:
    """The same dataset, every label of a row known at or after t_cut (ts + delay >= t_cut) flipped."""
    other = PreparedDataset(ds.root).load_into_memory()
    other.schema = ds.schema
    late = np.asarray(ds.col("_ts")) + delay >= t_cut
    for lab in ds.schema.response_names:
        col = f"label__{lab}" if lab in ds.schema.task_labels else f"resp__{lab}"
        y = np.array(ds.col(col))
        y[late] = 1 - y[late]
        other._cols[col] = y
    return other


@pytest.mark.parametrize("scheme", ["user", "temporal"])
def test_causal_tokens_never_depend_on_later_labels(synth_prepared, scheme):
    torch.set_num_threads(1)
    ds = synth_prepared
    cfg = IATSourceConfig(scheme=scheme, folds=4, **FAST)
    fold = fold_of_rows(ds, cfg)
    ts = np.asarray(ds.col("_ts"))
    t_cut = int(ts[fold == 2].min())  # the start of fold 2
    flipped = _with_later_labels_flipped(ds, t_cut)
    emb, _ = causal_embeddings(ds, cfg, seed=3, progress=False)
    emb_flipped, _ = causal_embeddings(flipped, cfg, seed=3, progress=False)
    # fold 2 itself is embedded before training on it: every token up to the end of fold 2 is unchanged
    early = fold <= 2
    np.testing.assert_array_equal(emb[early], emb_flipped[early])
    assert not np.allclose(emb[~early], emb_flipped[~early])  # later tokens did learn from the labels
    # the in-sample ablation leaks: early tokens change when only later labels change
    ins = IATSourceConfig(scheme=scheme, export_order="in_sample", **FAST)
    a = embed_all(train_source(ds, ins, 3, progress=False), ds, progress=False, workers=1)
    b = embed_all(train_source(flipped, ins, 3, progress=False), flipped, progress=False, workers=1)
    assert not np.allclose(a[early], b[early])


def test_causal_tokens_wait_for_delayed_task_labels(synth_prepared):
    """With a 2-day task-label delay, a fold's state trains only on labels known before the fold starts."""
    from sampletok.schema import Schema

    torch.set_num_threads(1)
    ds = PreparedDataset(synth_prepared.root).load_into_memory()
    spec = ds.schema.model_dump(mode="json")
    day = 86_400
    spec["labels"] = [{**lab, "delay": 2 * day} for lab in spec["labels"]]
    ds.schema = Schema.model_validate(spec)
    cfg = IATSourceConfig(scheme="user", folds=4, **FAST)
    fold = fold_of_rows(ds, cfg)
    t_cut = int(np.asarray(ds.col("_ts"))[fold == 2].min())
    flipped = _with_later_labels_flipped(ds, t_cut, delay=2 * day)
    emb, _ = causal_embeddings(ds, cfg, seed=3, progress=False)
    emb_flipped, _ = causal_embeddings(flipped, cfg, seed=3, progress=False)
    early = fold <= 2
    np.testing.assert_array_equal(emb[early], emb_flipped[early])
    assert not np.allclose(emb[~early], emb_flipped[~early])


def test_folds_cut_the_training_window_by_time(synth_prepared):
    ds = synth_prepared
    cfg = IATSourceConfig(folds=5, **FAST)
    fold = fold_of_rows(ds, cfg)
    ts, train = np.asarray(ds.col("_ts")), ds.rows("train")
    assert set(np.unique(fold[train])) == set(range(5))
    assert np.all(fold[np.setdiff1d(np.arange(ds.n_rows), train)] == 5)
    sizes = np.bincount(fold[train])
    assert sizes.max() - sizes.min() <= 0.05 * len(train)  # about equal (equal timestamps share a fold)
    for k in range(4):  # every row of fold k is earlier than every row of fold k + 1
        assert ts[train][fold[train] == k].max() < ts[train][fold[train] == k + 1].min()


def test_saved_iat_run_is_scored_with_its_own_store_only(synth_prepared, tmp_path):
    ds = synth_prepared
    params = {
        "base": "din",
        "token_len": 8,
        "token_dim": 8,
        "side_dim": 4,
        "encoder_layers": 0,
        "source": {"scheme": "user", "folds": 2, **FAST},
        "cache_dir": str(tmp_path / "cache"),
    }
    cfg = TrainConfig(max_epochs=1, batch_size=512, hist_len=8)
    r = run_model(ds, ModelSpec(name="iat", params=params), cfg, seed=7, run_dir=tmp_path / "run", progress=False)
    trained = load_trained(ds, tmp_path / "run")  # the seed-7 store, not a seed-0 one
    assert trained.tokens is not None and trained.tokens.producer == r["producer"]
    # a different store under the run's cache key (another seed's tokens): refused, one line
    stores = sorted(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    run_model(ds, ModelSpec(name="iat", params=params), cfg, seed=8, run_dir=tmp_path / "run8", progress=False)
    seed8 = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p not in stores][0]
    shutil.rmtree(stores[0])
    shutil.copytree(seed8, stores[0])
    with pytest.raises(StoreError, match="trained with tokens of producer"):
        load_trained(ds, tmp_path / "run")
    # no store at all: never quietly trains a new source model
    shutil.rmtree(stores[0])
    with pytest.raises(StoreError, match="never rebuilt at scoring time"):
        load_trained(ds, tmp_path / "run")
