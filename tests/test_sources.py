import hashlib

import numpy as np
import polars as pl
import pytest

from sampletok.data.prepare import prepare
from sampletok.data.sources.movielens import add_event_context, load_movielens, read_ml100k
from sampletok.data.sources.synthetic import SyntheticConfig, SyntheticSource, bayes_optimal_auc
from sampletok.errors import DataError

SHA = {"u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"}


def test_ml100k_reader(ml100k_dir, tmp_path):
    assert hashlib.sha256((ml100k_dir / "u.data").read_bytes()).hexdigest() == SHA["u.data"]
    df = read_ml100k(ml100k_dir)
    assert df.height == 100_000 and df.get_column("user_id").n_unique() == 943
    assert df.get_column("click").mean() == pytest.approx((df.get_column("rating") >= 4).mean())
    first = df.filter(pl.col("user_id") == 1).sort("timestamp")
    assert first.get_column("user_count").min() == 0 and first.get_column("gap_prev")[0] == -1
    src, schema = load_movielens(ml100k_dir)
    ds = prepare(src, schema, tmp_path / "ml", progress=False)
    assert ds.manifest["split_rows"] == {"train": 80_000, "valid": 10_000, "test": 10_000}
    assert ds.vocab_size("genres") == 19 + 2


def test_event_context_uses_strictly_earlier_events_only():
    df = pl.DataFrame({"user_id": [1, 1, 1, 1, 2], "timestamp": [10, 10, 20, 5, 7]})
    out = add_event_context(df)
    assert out.get_column("user_count").to_list() == [1, 1, 3, 0, 0]  # the two events at 10 never count each other
    assert out.get_column("gap_prev").to_list() == [5, 5, 10, -1, -1]


def test_ml_latest_layout(tmp_path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.5,100\n1,11,2.0,200\n2,10,5.0,150\n")
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n10,Heat (1995),Action|Crime\n11,"Up, Up (2009)",(no genres listed)\n'
    )
    (tmp_path / "tags.csv").write_text("userId,movieId,tag,timestamp\n1,10,good,150\n1,11,meh,200\n")
    src, schema = load_movielens(tmp_path)
    df = src.frame
    assert df.get_column("click").to_list() == [1, 0, 1]
    assert df.get_column("release_year").to_list() == [1995.0, 2009.0, 1995.0]
    assert df.get_column("user_tags_before").to_list() == [0.0, 1.0, 0.0]  # the tag at 200 is not before 200
    assert schema.name == "ml-latest"


def test_not_a_movielens_folder(tmp_path):
    with pytest.raises(DataError, match="not a MovieLens folder"):
        load_movielens(tmp_path)


def test_synthetic_is_deterministic_and_chunk_independent():
    cfg = SyntheticConfig(n_users=120, n_items=100, events_per_user=10, users_per_chunk=50, seed=4)
    a = SyntheticSource(cfg).to_frame()
    b = SyntheticSource(cfg).to_frame()
    assert a.equals(b)
    assert len(list(SyntheticSource(cfg).frames())) == 3
    assert a.width == len(SyntheticSource(cfg).schema.raw_columns)
    assert set(a.get_column("click").unique().to_list()) == {0, 1}
    assert (a.get_column("conversion") <= a.get_column("click")).all()


def test_dense_synthetic_log_has_unique_samples_and_prepares(tmp_path):
    # 3 users x ~4,000 events in one day on 10 items: many draws repeat (user, second, item)
    cfg = SyntheticConfig(n_users=3, n_items=10, categories=2, events_per_user=4000, days=1, seed=1)
    src = SyntheticSource(cfg)
    df = src.to_frame()
    assert df.select("user_key", "ts", "item_id").is_duplicated().sum() == 0
    ds = prepare(src, src.schema, tmp_path / "p", progress=False)
    assert len(np.unique(ds.col("_instance_id"))) == df.height


def test_unique_event_times_moves_only_repeats():
    from sampletok.data.sources.synthetic import _unique_event_times

    uid, item = np.array([0, 0, 0, 1, 0]), np.array([5, 5, 5, 5, 6])
    ts = np.array([10, 10, 10, 10, 11])
    out = _unique_event_times(uid, ts, item)
    assert sorted(out[:3].tolist()) == [10, 11, 12] and out[3] == 10 and out[4] == 11
    clean = np.array([3, 1, 2, 1, 9])
    assert np.array_equal(_unique_event_times(uid, clean, item), clean)


@pytest.mark.parametrize("n_fields", [20, 100, 600])
def test_synthetic_field_counts(n_fields):
    cfg = SyntheticConfig(n_users=20, n_items=50, events_per_user=5, n_fields=n_fields)
    src = SyntheticSource(cfg)
    assert len(src.schema.features) == n_fields
    assert {f.group for f in src.schema.features} == {"user", "item", "context", "cross"}
    assert next(src.frames()).width == n_fields + 4  # + user key, ts, click, conversion


def test_bayes_optimal_auc_beats_chance_and_is_an_upper_reference():
    opt = bayes_optimal_auc(SyntheticConfig(n_users=300, n_items=200, events_per_user=30))
    assert 0.7 < opt["auc"] < 1.0
    # the planted history-only signal carries real information: without it even the oracle loses AUC
    assert 0.5 < opt["auc_without_regime"] < opt["auc"] - 0.05
    assert opt["auc_regime_only"] > 0.6
