"""Responses as first-class schema parts: declared types (binary, numeric with the feature normalizations fitted
on the training window, categorical), availability by delay or by a ``known_at`` column, one-line schema and
data errors, the duplicates policy, and the property that no response of a row at or after the request, or
not yet known, reaches any model input."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sampletok.columns import NEVER
from sampletok.data.batches import BatchLoader
from sampletok.data.dataset import PreparedDataset, SplitSpec
from sampletok.data.prepare import prepare
from sampletok.data.sources import FrameSource
from sampletok.errors import DataError, SchemaError
from sampletok.features import FeatureLayout
from sampletok.models import build_model
from sampletok.nn import ResponseEncoder
from sampletok.schema import Schema

SCHEMA = {
    "name": "resp",
    "user": "uid",
    "timestamp": "ts",
    "item": "iid",
    "labels": [{"name": "click"}],
    "responses": [
        {"name": "liked"},  # binary, known at once
        {"name": "watch_s", "type": "numeric", "normalize": "log_standard", "delay": 10},
        {"name": "reason", "type": "categorical", "known_at": "reason_at"},
        {"name": "depth", "type": "numeric", "normalize": "bucketize", "buckets": 4},
    ],
    "features": [
        {"name": "uid", "type": "categorical", "group": "user"},
        {"name": "iid", "type": "categorical", "group": "item"},
        {"name": "price", "type": "numeric", "group": "item"},
    ],
    "sequence": {"fields": ["iid"], "max_len": 6},
}


def _frame(n: int = 400, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    ts = np.arange(n, dtype=np.int64) * 3 + rng.integers(0, 3, n)  # distinct per row
    later = rng.integers(0, 40, n)
    return pl.DataFrame(
        {
            "uid": rng.integers(0, 10, n),
            "ts": ts,
            "click": rng.integers(0, 2, n),
            "liked": rng.integers(0, 2, n),
            "watch_s": rng.exponential(30.0, n),
            "reason": rng.choice(["a", "b", "c"], n).tolist(),
            # known some seconds after the event; every 7th row never (null)
            "reason_at": pl.Series(
                [None if i % 7 == 0 else int(t + d) for i, (t, d) in enumerate(zip(ts, later, strict=True))]
            ),
            "depth": rng.integers(0, 100, n).astype(float),
            "iid": rng.integers(0, 25, n),
            "price": rng.normal(5.0, 1.0, n),
        }
    )


@pytest.fixture(scope="module")
def resp_ds(tmp_path_factory) -> PreparedDataset:
    schema = Schema.model_validate(SCHEMA)
    return prepare(FrameSource(_frame(), "resp"), schema, tmp_path_factory.mktemp("resp") / "ds", progress=False)


# ---------------------------------------------------------------------------------------------------- schema
@pytest.mark.parametrize(
    "change, needle",
    [
        (
            {"features": [*SCHEMA["features"], {"name": "liked", "type": "categorical", "group": "context"}]},
            "response 'liked' is also a feature",
        ),
        ({"labels": [{"name": "click"}, {"name": "liked", "task": False}]}, "declare it under responses"),
        ({"responses": [{"name": "reason", "type": "categorical", "known_at": "ts"}]}, "known_at column 'ts'"),
        ({"responses": [{"name": "r", "delay": 5, "known_at": "r_at"}]}, "either delay or known_at"),
        ({"responses": [{"name": "click"}]}, "labels/responses defined twice"),
    ],
)
def test_schema_mistakes_are_one_line_errors(change, needle):
    with pytest.raises(SchemaError) as e:
        Schema.from_dict({**SCHEMA, **change})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_layout_names_responses_after_the_task_labels(resp_ds):
    lay = FeatureLayout.from_dataset(resp_ds)
    assert lay.responses == ["click", "liked", "watch_s", "reason", "depth"]
    # categorical and bucketized responses have tables (0 padding, known values, OOV); the rest are values
    assert lay.response_vocab_sizes == {"reason": 5, "depth": 6}


# ---------------------------------------------------------------------------------------------------- prepare
def test_numeric_responses_are_normalized_with_training_window_statistics(resp_ds):
    df = _frame()
    split = np.asarray(resp_ds.col("_split"))
    x = np.log1p(df["watch_s"].to_numpy())
    mean, std = x[split == 0].mean(), x[split == 0].std()
    np.testing.assert_allclose(resp_ds.col("resp__watch_s"), (x - mean) / std, rtol=1e-5, atol=1e-5)
    assert resp_ds.stats["watch_s"].mean == pytest.approx(mean)  # not the mean over every row
    assert abs(x.mean() - mean) > 1e-4
    depth = resp_ds.col("resp__depth")
    assert set(np.unique(depth)) == {1, 2, 3, 4}  # 4 quantile buckets
    np.testing.assert_array_equal(resp_ds.col("resp__liked"), df["liked"].to_numpy())


def test_categorical_responses_use_a_training_vocabulary_with_oov(tmp_path):
    df = _frame()
    split = SplitSpec(cut_ts=(int(df["ts"][300]), int(df["ts"][350])))
    reason = df["reason"].to_list()
    reason[360] = "unseen-in-train"
    ds = prepare(
        FrameSource(df.with_columns(reason=pl.Series(reason)), "r"), Schema.model_validate(SCHEMA), tmp_path / "d",
        split, progress=False,
    )  # fmt: skip
    codes = np.asarray(ds.col("resp__reason"))
    assert codes[360] == ds.response_vocab_size("reason") - 1  # OOV
    vocab = ds.stats["reason"].vocab
    assert codes[0] == vocab.index(reason[0]) + 1


def test_known_at_null_is_never_known_and_before_the_event_is_an_error(resp_ds, tmp_path):
    known = np.asarray(resp_ds.col("known__reason"))
    assert (known[::7] == NEVER).all() and (known[1::7] < NEVER).all()
    df = _frame()
    bad = df.with_columns(reason_at=pl.when(pl.int_range(pl.len()) == 5).then(pl.col("ts") - 1).otherwise("reason_at"))
    with pytest.raises(DataError) as e:
        prepare(FrameSource(bad, "bad.csv"), Schema.model_validate(SCHEMA), tmp_path / "x", progress=False)
    msg = str(e.value)
    assert "bad.csv" in msg and "'reason_at'" in msg and "row 6" in msg and "known before its event" in msg
    wrong = df.with_columns(liked=pl.when(pl.int_range(pl.len()) == 3).then(2).otherwise("liked"))
    with pytest.raises(DataError, match=r"column 'liked', row 4: binary response is 2.0, not 0 or 1"):
        prepare(FrameSource(wrong, "w"), Schema.model_validate(SCHEMA), tmp_path / "y", progress=False)


# ---------------------------------------------------------------------------------------------------- leakage
def _visible_reference(ds: PreparedDataset, rows: np.ndarray, req_ts: np.ndarray) -> np.ndarray:
    """[B, n, R] which responses each history row may show: row ts < request and known before the request."""
    known_at = ds.response_available_at()
    ts = np.asarray(ds.col("_ts"))
    safe = np.maximum(rows, 0)
    return (rows >= 0)[..., None] & (ts[safe] < req_ts[:, None])[..., None] & (known_at[safe] < req_ts[:, None, None])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 1300), min_size=1, max_size=40), st.integers(0, 9), st.integers(1, 12))
def test_no_response_at_or_after_the_request_or_not_yet_known_reaches_a_batch(resp_ds, times, user, n):
    """Any user, any request time (also between events): a history response is non-zero only where the
    reference says it is known, and its known-flag is exactly the reference's."""
    loader = BatchLoader(resp_ds, np.zeros(0, np.int64), hist_len=n)
    req = np.array(times, np.int64)
    users = np.full(len(req), user, np.int64)
    h = loader.index.fetch(users, req, n)
    visible = _visible_reference(resp_ds, h.rows, req)
    np.testing.assert_array_equal(h.response_mask, visible)
    # the batch built for real request rows carries only visible responses
    rows = resp_ds.rows("test")[: len(req)]
    b = loader.build(rows)
    ref = _visible_reference(resp_ds, b.hist_rows.numpy(), b.ts.numpy())
    np.testing.assert_array_equal(b.hist_response_mask.numpy(), ref)
    assert (b.hist_responses.numpy()[~ref] == 0).all()


READERS = [("din", {"history_responses": True}), ("hstu", {}), ("sif", {"hgaq": {"codes": 16, "levels": 2}})]


@pytest.mark.parametrize("name, params", READERS, ids=[r[0] for r in READERS])
def test_models_read_responses_only_once_known(resp_ds, name, params):
    """Whatever an unknown response's value, the score is unchanged; changing known ones (a value response, a
    categorical code) changes it."""
    torch.manual_seed(0)
    model = build_model(name, FeatureLayout.from_dataset(resp_ds), **params)
    model.eval()
    rows = resp_ds.rows("test")
    batch = BatchLoader(resp_ds, rows, len(rows), hist_len=6, history_samples=model.reads_history_samples).build(rows)
    unknown = ~batch.hist_response_mask & batch.hist_mask.unsqueeze(-1)
    known = batch.hist_response_mask
    assert unknown[..., 3].any() and unknown[..., 2].any() and known[..., 3].any()
    poked = batch.hist_responses.clone()
    poked[unknown] = 3.0
    changed = batch.hist_responses.clone()
    changed[..., 1][known[..., 1]] = 1 - changed[..., 1][known[..., 1]]  # liked
    changed[..., 3][known[..., 3]] = changed[..., 3][known[..., 3]] % 3 + 1  # reason code
    with torch.no_grad():
        base = model(batch).logits
        torch.testing.assert_close(model(dataclasses.replace(batch, hist_responses=poked)).logits, base)
        assert not torch.allclose(model(dataclasses.replace(batch, hist_responses=changed)).logits, base)


def test_response_encoder_reads_the_named_responses_only(resp_ds):
    lay = FeatureLayout.from_dataset(resp_ds)
    torch.manual_seed(0)
    only_label = ResponseEncoder(lay, 8, ["click"])
    x = torch.rand(2, 3, 5)
    known = torch.ones(2, 3, 5, dtype=torch.bool)
    y = x.clone()
    y[..., 1:] = torch.rand(2, 3, 4) * 3
    torch.testing.assert_close(only_label(x, known), only_label(y, known))
    assert ResponseEncoder(lay, 8, False)(x, known).abs().sum() == 0
    with pytest.raises(ValueError, match=r"responses \['nope'\] are not in the schema"):
        ResponseEncoder(lay, 8, ["nope"])


def test_store_exports_carry_response_availability(resp_ds, tmp_path):
    """The IAT token store and the SIF code store show a response exactly when the history index does, and
    IAT's responses information reads only known responses (or none with ``side_responses: false``)."""
    from sampletok.tokenizers.iat import IATSourceConfig, SourceModel
    from sampletok.tokens import open_tokens
    from sampletok.tokens.iat import export_to_store
    from sampletok.tokens.sif import export_codes

    layout = FeatureLayout.from_dataset(resp_ds)
    sif = build_model("sif", layout, hgaq={"codes": 16, "levels": 2})
    src = SourceModel(layout, IATSourceConfig(epochs=1, hidden=[8], decompress=[8], emb_dim=4, dtype="float32"))
    stores = {
        "sif": export_codes(sif, resp_ds, tmp_path / "codes", progress=False),
        "iat": export_to_store(src.eval(), resp_ds, tmp_path / "iat", progress=False),
    }
    rows = resp_ds.rows("test")
    b = BatchLoader(resp_ds, rows, len(rows), hist_len=6).build(rows)
    for store in stores.values():
        f = store.fetch(b.user.numpy(), b.ts.numpy(), 6, dequantize=False)
        np.testing.assert_array_equal(f.response_mask, b.hist_response_mask.numpy())
        np.testing.assert_allclose(f.responses, b.hist_responses.numpy())
    torch.manual_seed(0)
    for side_responses in (True, False):
        iat = build_model("iat", layout, store=str(tmp_path / "iat"), source={"emb_dim": 4}, token_len=6,
                          side_responses=side_responses)  # fmt: skip
        tokens = open_tokens(iat, resp_ds, seed=0, hist_len=6, progress=False)
        iat.eval()
        tb = BatchLoader(resp_ds, rows, len(rows), hist_len=6, tokens=tokens).build(rows)
        assert tb.tokens is not None
        f = tb.tokens
        unknown = ~f.response_mask & f.mask[..., None]
        assert unknown.any()
        with torch.no_grad():
            base = iat(tb).logits
            f.responses[unknown] = 5.0  # the fetched values of unknown responses cannot matter
            torch.testing.assert_close(iat(tb).logits, base)
            f.responses[f.response_mask] += 1.0  # known ones do, unless side_responses is off
            assert torch.allclose(iat(tb).logits, base) is not side_responses


# ---------------------------------------------------------------------------------------------------- duplicates
def _with_repeats() -> pl.DataFrame:
    df = _frame(60)
    # rows 10 and 20 repeated (same user, item, time), row 20 twice; the copies differ in their label
    extra = pl.concat([df[10], df[20], df[20]]).with_columns(click=1 - pl.col("click"))
    return pl.concat([df[:30], extra, df[30:]])


@pytest.mark.parametrize("policy, rows, removed", [("keep_first", 60, 3), ("drop", 58, 5)])
def test_duplicates_policy_removes_and_counts(tmp_path, policy, rows, removed):
    df = _with_repeats()
    ds = prepare(
        FrameSource(df, "dups.csv"), Schema.model_validate({**SCHEMA, "duplicates": policy}), tmp_path / "d",
        progress=False,
    )  # fmt: skip
    assert ds.n_rows == rows
    assert ds.manifest["duplicates"] == {"policy": policy, "repeated_ids": 2, "rows_removed": removed}
    clicks = np.asarray(ds.col("label__click"))
    if policy == "keep_first":  # the first (original) row's label survives, and every column stays aligned
        np.testing.assert_array_equal(clicks, _frame(60)["click"].to_numpy())
        np.testing.assert_allclose(ds.col("resp__liked"), _frame(60)["liked"].to_numpy())


def test_duplicates_are_an_error_by_default(tmp_path):
    with pytest.raises(DataError) as e:
        prepare(FrameSource(_with_repeats(), "dups.csv"), Schema.model_validate(SCHEMA), tmp_path / "d", progress=False)
    msg = str(e.value)
    assert "dups.csv" in msg and "same as row 11" in msg and "duplicates: drop or keep_first" in msg
    assert "\n" not in msg
