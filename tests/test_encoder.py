"""The fitted Encoder gives exactly prepare's codes: on every row of ml-100k (and the KuaiRand log with its
responses), from a polars frame, from dicts and from JSON; unknown fields, bad cells and bad JSON are one-line
errors naming the field and row; unseen values are OOV."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sampletok.data.encoder import Encoder
from sampletok.data.prepare import prepare
from sampletok.errors import DataError
from sampletok.features import FeatureLayout
from tests.conftest import TOY_SCHEMA, toy_frame


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


# ---------------------------------------------------------------- the plain-Python kernel against polars
_KERNEL_SCHEMA = {
    **TOY_SCHEMA,
    "duplicates": "keep_first",
    "features": [
        *TOY_SCHEMA["features"],
        {"name": "city", "type": "categorical", "group": "user"},
        {"name": "dwell", "type": "numeric", "group": "context", "normalize": "log_standard", "nan_policy": "fill"},
        {"name": "raw", "type": "numeric", "group": "context", "normalize": "none"},
    ],
}
_TEXT = st.sampled_from(["", "0", "1", "3", " 2", "a", "ab", "1|2", "x||y", "|", "3.0", "nan", "é"])
_SCALAR = st.one_of(
    st.none(),
    _TEXT,
    st.integers(-3, 35),
    st.sampled_from([2**53, 2**53 + 1, 2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([3.0, -0.0, 1e16, 2.5, 0.5]),
    st.booleans(),
)
_CELL = st.one_of(_SCALAR, st.lists(st.one_of(_TEXT, st.integers(0, 5), st.none()), max_size=5))


@pytest.fixture(scope="module")
def kernel_encoders(tmp_path_factory):
    from sampletok.data.sources import FrameSource
    from sampletok.schema import Schema

    frame = toy_frame(300).with_columns(
        city=pl.Series(["a", "b", "ab", "3", "é"] * 60),
        dwell=pl.Series(np.random.default_rng(1).exponential(5, 300)),
        raw=pl.Series(np.random.default_rng(2).normal(0, 1, 300)),
    )
    ds = prepare(FrameSource(frame, "toy"), Schema.model_validate(_KERNEL_SCHEMA), tmp_path_factory.mktemp("k") / "ds",
                 progress=False)  # fmt: skip
    return Encoder(ds.schema, ds.stats, kernel="auto"), Encoder(ds.schema, ds.stats, kernel="polars")


def _outcome(enc: Encoder, rows: list, fields) -> tuple:
    try:
        codes = enc.encode(rows, fields=fields)
    except Exception as e:  # the same refusal from both, whatever it is
        return ("error", type(e).__name__, str(e))
    return ("codes", {k: (v.dtype.str, v.tolist()) for k, v in codes.items()})


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_plain_python_kernel_encodes_dict_rows_like_polars(kernel_encoders, data):
    """Served rows take the plain-Python kernel (no polars call); every cell it takes gets the reference's
    codes (nulls, whole floats of a categorical field, delimited and list cells, NaN filled or refused), and
    every cell it does not take (bools, numeric strings, 2.5 in a categorical field) the reference's answer."""
    fast, ref = kernel_encoders
    names = [f["name"] for f in _KERNEL_SCHEMA["features"]]
    columns = {n: data.draw(st.sampled_from(["tidy", "any"]), label=f"{n} kind") for n in names}
    n = data.draw(st.integers(1, 5), label="rows")
    tidy = {  # values of the field's own kind (what a client sends): the fast path's domain
        "uid": st.one_of(st.none(), st.integers(0, 40), st.sampled_from([3.0, 7.0, 2**53 + 1])),
        "iid": st.integers(0, 35),
        "tags": st.one_of(st.none(), st.sampled_from(["1|2", "", "4", "x||y"]), st.lists(_TEXT, max_size=4)),
        "price": st.one_of(st.none(), st.floats(-50, 50), st.integers(-5, 5)),
        "pop": st.floats(0, 10),
        "city": st.one_of(st.none(), _TEXT),
        "dwell": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=False), st.integers(0, 100)),
        "raw": st.floats(-3, 3),
    }
    rows = [{k: data.draw(tidy[k] if columns[k] == "tidy" else _CELL, label=k) for k in names} for _ in range(n)]
    if data.draw(st.booleans(), label="drop a field"):
        rows[0].pop(data.draw(st.sampled_from(names), label="dropped"))
    fields = data.draw(st.sampled_from([None, {"uid", "city", "dwell"}, {"iid", "tags", "price", "pop", "raw"}]))
    if fields is not None:  # as the service calls it: a request's shared row, or its candidates' own fields
        rows = [{k: v for k, v in r.items() if k in fields} for r in rows]
    assert _outcome(fast, rows, fields) == _outcome(ref, rows, fields)


def test_plain_python_kernel_is_taken_for_tidy_rows(kernel_encoders, monkeypatch):
    """The kernel is the path served rows take (not a fallback that always defers to polars)."""
    from sampletok.data import encoder as encoder_module

    fast, _ = kernel_encoders
    row = {"uid": 3, "iid": 7, "tags": "1|2", "price": 10.5, "pop": 1.0, "city": "a", "dwell": 2, "raw": 0.1}
    monkeypatch.setattr(encoder_module, "encode_chunk", lambda *a, **k: pytest.fail("took the polars path"))
    codes = fast.encode([row, {**row, "tags": "4", "uid": 5.0}])
    assert codes["cat__uid"].tolist() == [fast._lookup["uid"].codes["3"], fast._lookup["uid"].codes["5"]]


def test_cells_no_column_can_hold_are_a_one_line_error(kernel_encoders):
    fast, _ = kernel_encoders
    row = {"uid": 3, "iid": 7, "tags": "1|2", "price": 10.5, "pop": 1.0, "city": "a", "dwell": 2, "raw": 0.1}
    with pytest.raises(DataError, match=r"^POST /score, column 'iid': cannot read the cells \(TypeError") as e:
        fast.encode([row, {**row, "iid": []}], origin="POST /score")
    assert "\n" not in str(e.value)
