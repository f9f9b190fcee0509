"""The fitted Encoder gives exactly prepare's codes: on every row of ml-100k (and the KuaiRand log with its
responses), from a polars frame, from dicts and from JSON; unknown fields, bad cells and bad JSON are one-line
errors naming the field and row; unseen values are OOV."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from sampletok.data.encoder import Encoder
from sampletok.data.prepare import prepare
from sampletok.errors import DataError
from sampletok.features import FeatureLayout


def _check_equal(ds, codes, rows=None):
    rows = np.arange(ds.n_rows) if rows is None else rows
    assert codes, "nothing encoded"
    for name, values in codes.items():
        np.testing.assert_array_equal(
            np.asarray(values).astype(ds.col(name).dtype), np.asarray(ds.col(name))[rows], err_msg=name
        )


@pytest.fixture(scope="module")
def ml100k(ml100k_dir, tmp_path_factory):
    from sampletok.data.sources.movielens import load_movielens

    source, schema = load_movielens(ml100k_dir)
    ds = prepare(source, schema, tmp_path_factory.mktemp("ml") / "ds", progress=False)
    return source, ds


def test_every_ml100k_row_encodes_to_the_prepared_codes(ml100k):
    source, ds = ml100k
    enc = Encoder.from_manifest(ds.root)
    codes = enc.encode(source.frame, outcomes=True)
    assert {"cat__item_id", "multi__genres", "label__click", "resp__rating"} <= set(codes)
    _check_equal(ds, codes)
    # a layout built from the encoder alone is the dataset's (a serving process loads no column)
    assert FeatureLayout.from_dataset(enc) == FeatureLayout.from_dataset(ds)


def test_dicts_json_and_arrow_encode_like_the_frame(ml100k):
    source, ds = ml100k
    enc = Encoder.from_dataset(ds)
    picks = np.array([0, 17, 4242, ds.n_rows - 1])
    sub = source.frame[picks.tolist()]
    dicts = sub.to_dicts()
    _check_equal(ds, enc.encode(dicts, outcomes=True), picks)
    _check_equal(ds, enc.encode(json.dumps(dicts), outcomes=True), picks)
    _check_equal(ds, enc.encode(pa.Table.from_pylist(dicts), outcomes=True), picks)
    one = enc.encode(dicts[1])  # a request: features only
    assert not any(k.startswith(("label__", "resp__")) for k in one)
    np.testing.assert_array_equal(one["cat__item_id"], np.asarray(ds.col("cat__item_id"))[[17]])


def test_kuairand_rows_with_responses_encode_to_the_prepared_codes(tmp_path):
    from sampletok.data.sources.kuairand import load_kuairand
    from tests.conftest import shared_path

    source, schema = load_kuairand(shared_path("kuairand-likes"))
    ds = prepare(source, schema, tmp_path / "kr", progress=False)
    kept = source.frame.with_row_index("_i").unique(
        ["user_id", "video_id", "time_ms"], keep="first", maintain_order=True
    )
    codes = Encoder.from_dataset(ds).encode(kept.drop("_i"), outcomes=True)
    assert "resp__play_time_s" in codes
    _check_equal(ds, codes)


def test_bad_requests_are_one_line_errors(ml100k):
    source, ds = ml100k
    enc = Encoder.from_dataset(ds)
    row = source.frame.row(0, named=True)
    cases = [
        ({**row, "colour": "red"}, "unknown field(s) ['colour']"),
        ({k: v for k, v in row.items() if k != "age"}, "missing field(s) ['age']"),
        ({**row, "age": "old"}, "column 'age', row 1: expected a number, got 'old'"),
        ("{not json", "not JSON"),
    ]
    for bad, needle in cases:
        with pytest.raises(DataError) as e:
            enc.encode(bad, origin="POST /score")
        assert needle in str(e.value) and str(e.value).startswith("POST /score") and "\n" not in str(e.value)


def test_unseen_values_are_oov_and_missing_fields_null_when_lenient(ml100k):
    source, ds = ml100k
    enc = Encoder.from_dataset(ds)
    row = {**source.frame.row(0, named=True), "item_id": "no-such-item", "user_id": 10**9}
    codes = enc.encode(row)
    assert codes["cat__item_id"][0] == ds.vocab_size("item_id") - 1
    assert codes["cat__user_id"][0] == ds.vocab_size("user_id") - 1
    lenient = enc.encode({k: v for k, v in row.items() if k != "gender"}, strict=False)
    assert lenient["cat__gender"][0] == 0  # a missing categorical field → padding


def test_small_batches_encode_like_prepare_on_every_ml100k_row(ml100k):
    """A served request's few rows take the dict lookup (polars' cost per call dominates there): every row
    of ml-100k, in batches of at most VocabLookup.SMALL, gets prepare's codes."""
    from sampletok.data.codec import VocabLookup

    source, ds = ml100k
    enc = Encoder.from_dataset(ds)
    step = VocabLookup.SMALL
    parts = [enc.encode(source.frame[i : i + step], outcomes=True) for i in range(0, ds.n_rows, step)]
    codes = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    _check_equal(ds, codes)
