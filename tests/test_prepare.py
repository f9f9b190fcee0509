import json
import os

import numpy as np
import polars as pl
import pytest

from sampletok.data.dataset import PreparedDataset, SplitSpec, assign_splits
from sampletok.data.prepare import prepare
from sampletok.data.sources import FileSource, FrameSource
from sampletok.errors import DataError
from sampletok.schema import Schema
from tests.conftest import TOY_SCHEMA, toy_frame


def _frame():
    return toy_frame().unique(subset=["uid", "iid", "ts"], keep="first", maintain_order=True)


def test_vocab_is_frequency_ordered_with_padding_and_oov_and_fit_on_train_only(tmp_path, toy_schema):
    df = _frame()
    ds = prepare(FrameSource(df, "toy"), toy_schema, tmp_path / "d", progress=False)
    split = np.asarray(ds.col("_split"))
    train_iids = df.get_column("iid").cast(pl.Utf8).filter(pl.Series(split == 0))
    counts = train_iids.value_counts().sort(["count", "iid"], descending=[True, False])
    vocab = ds.stats["iid"].vocab
    assert vocab == counts.get_column("iid").to_list()
    assert ds.vocab_size("iid") == len(vocab) + 2
    codes = np.asarray(ds.col("cat__iid"))
    raw = df.get_column("iid").cast(pl.Utf8).to_list()
    oov = ds.vocab_size("iid") - 1
    for code, value in zip(codes, raw, strict=True):
        assert code == (vocab.index(value) + 1 if value in vocab else oov)
    assert codes.min() >= 1  # 0 is reserved for padding


def test_multi_categorical_and_numeric_encoding(tmp_path, toy_schema):
    df = _frame()
    ds = prepare(FrameSource(df, "toy"), toy_schema, tmp_path / "d", progress=False)
    tags = np.asarray(ds.col("multi__tags"))
    vocab = ds.stats["tags"].vocab
    for cell, row in zip(df.get_column("tags").to_list()[:50], tags[:50], strict=True):
        vals = [v for v in cell.split("|") if v != ""]
        expect = [vocab.index(v) + 1 if v in vocab else len(vocab) + 1 for v in vals][:3]
        assert row.tolist() == expect + [0] * (3 - len(expect))
    price = np.asarray(ds.col("num__price"))
    tr = np.asarray(ds.col("_split")) == 0
    assert abs(price[tr].mean()) < 1e-5 and abs(price[tr].std() - 1) < 1e-4
    pop = np.asarray(ds.col("cat__pop"))
    assert pop.min() >= 1 and pop.max() <= ds.vocab_size("pop") - 1


def test_splits_are_time_ordered_and_seen_user_filter(toy_prepared):
    ts = np.asarray(toy_prepared.col("_ts"))
    tr, va, te = (toy_prepared.rows(s) for s in ("train", "valid", "test"))
    assert ts[tr].max() <= ts[va].min() and ts[va].max() <= ts[te].min()
    assert len(tr) + len(va) + len(te) == toy_prepared.n_rows
    seen = toy_prepared.rows("test", seen_users_only=True)
    users = np.asarray(toy_prepared.col("_user_key"))
    assert set(users[seen]) <= set(users[tr])
    assert np.all(np.diff(ts[te]) >= 0)


def test_cut_ts_split():
    code = assign_splits(np.array([1, 5, 9, 10, 3]), SplitSpec(cut_ts=(5, 10)))
    assert code.tolist() == [0, 1, 1, 2, 0]


def test_chunked_preparation_equals_one_chunk(tmp_path, toy_schema):
    df = _frame()
    a = prepare(FrameSource(df, "toy", chunk_rows=17), toy_schema, tmp_path / "a", progress=False)
    b = prepare(FrameSource(df, "toy"), toy_schema, tmp_path / "b", progress=False)
    assert a.manifest["columns"] == b.manifest["columns"]  # identical bytes (checksums)


def test_skip_when_unchanged_and_redo_when_changed(tmp_path, toy_schema):
    df = _frame()
    a = prepare(FrameSource(df, "toy"), toy_schema, tmp_path / "d", progress=False)
    stamp = a.manifest["created_at"], os.stat(tmp_path / "d" / "manifest.json").st_mtime_ns
    again = prepare(FrameSource(df, "toy"), toy_schema, tmp_path / "d", progress=False)
    assert (again.manifest["created_at"], os.stat(tmp_path / "d" / "manifest.json").st_mtime_ns) == stamp
    changed = prepare(FrameSource(df.head(150), "toy"), toy_schema, tmp_path / "d", progress=False)
    assert changed.n_rows == 150


def _write_csv(tmp_path, df, name="log.csv"):
    p = tmp_path / name
    df.write_csv(p)
    return p


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda df: df.drop("price"), r"missing columns \['price'\]"),
        (lambda df: df.with_columns(extra=pl.lit(1)), r"unexpected columns \['extra'\]"),
    ],
)
def test_missing_and_extra_columns(tmp_path, toy_schema, mutate, needle):
    p = _write_csv(tmp_path, mutate(_frame()))
    with pytest.raises(DataError, match=needle):
        prepare(FileSource(p), toy_schema, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _with_cell(df, row, column, value):
    s = df.get_column(column).cast(pl.Utf8).to_list()
    s[row] = value
    return df.with_columns(pl.Series(column, s, dtype=pl.Utf8))


@pytest.mark.parametrize(
    "column, value, needle",
    [
        ("price", "abc", r"log.csv, column 'price', row 8: expected a number, got 'abc'"),
        ("price", "nan", r"log.csv, column 'price', row 8: missing or non-finite value"),
        ("ts", "yesterday", r"log.csv, column 'ts', row 8: unparseable timestamp 'yesterday'"),
        ("uid", None, r"log.csv, column 'uid', row 8: null user key"),
        ("ts", None, r"log.csv, column 'ts', row 8: null timestamp"),
        ("click", "x", r"log.csv, column 'click', row 8: expected a number"),
    ],
)
def test_bad_cells_name_file_column_row(tmp_path, toy_schema, column, value, needle):
    p = _write_csv(tmp_path, _with_cell(_frame(), 7, column, value))
    with pytest.raises(DataError, match=needle):
        prepare(FileSource(p, chunk_rows=5), toy_schema, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


def test_nan_fill_policy(tmp_path):
    feats = [dict(f) for f in TOY_SCHEMA["features"]]
    feats[3] = {**feats[3], "nan_policy": "fill", "fill_value": 10.0}
    schema = Schema.from_dict({**TOY_SCHEMA, "features": feats})
    df = _frame().with_columns(price=pl.when(pl.int_range(pl.len()) == 3).then(float("nan")).otherwise(pl.col("price")))
    ds = prepare(FrameSource(df, "toy"), schema, tmp_path / "d", progress=False)
    assert np.isfinite(np.asarray(ds.col("num__price"))).all()


def test_duplicate_instance_ids_are_reported(tmp_path, toy_schema):
    df = _frame()
    dup = pl.concat([df, df.slice(4, 1)])
    p = _write_csv(tmp_path, dup)
    msg = rf"column '\(derived instance id\)', row {dup.height}: duplicate instance id \(same as row 5\)"
    with pytest.raises(DataError, match=msg):
        prepare(FileSource(p), toy_schema, tmp_path / "out", progress=False)


def test_failed_reprepare_keeps_old_dataset(tmp_path, toy_schema):
    good = prepare(FrameSource(_frame(), "toy"), toy_schema, tmp_path / "d", progress=False)
    before = json.loads((tmp_path / "d" / "manifest.json").read_text())
    p = _write_csv(tmp_path, _with_cell(_frame(), 3, "price", "oops"))
    with pytest.raises(DataError):
        prepare(FileSource(p), toy_schema, tmp_path / "d", progress=False)
    assert json.loads((tmp_path / "d" / "manifest.json").read_text()) == before
    assert PreparedDataset(tmp_path / "d").n_rows == good.n_rows


def test_parquet_and_csv_give_the_same_dataset(tmp_path, toy_schema):
    df = _frame()
    df.write_parquet(tmp_path / "log.parquet")
    a = prepare(FileSource(tmp_path / "log.parquet"), toy_schema, tmp_path / "a", progress=False)
    b = prepare(FileSource(_write_csv(tmp_path, df)), toy_schema, tmp_path / "b", progress=False)
    for name in a.manifest["columns"]:
        np.testing.assert_array_equal(np.asarray(a.col(name)), np.asarray(b.col(name)), err_msg=name)


def test_row_filter_by_raw_values(toy_prepared):
    raw_codes = np.asarray(toy_prepared.col("cat__iid"))
    vocab = toy_prepared.stats["iid"].vocab
    mask = toy_prepared.where({"iid": [vocab[0], vocab[1], "never-seen"]})
    assert mask.sum() == np.isin(raw_codes, [1, 2]).sum() > 0
    rows = toy_prepared.rows("train", where={"iid": [vocab[0]]})
    assert set(raw_codes[rows]) == {1}
    with pytest.raises(DataError, match="not a categorical field"):
        toy_prepared.where({"price": [1]})
