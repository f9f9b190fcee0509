"""Label delays are seconds whatever the log's timestamp unit: on an ``ms`` log a label with ``delay: 3600``
becomes visible one hour after its event in every path that reads availability (history index, IAT and SIF
store exports and their fetch)."""

import numpy as np
import polars as pl
import pytest

from sampletok.data.batches import BatchLoader, history_index
from sampletok.data.prepare import prepare
from sampletok.data.sources import FrameSource
from sampletok.features import FeatureLayout
from sampletok.models import build_model
from sampletok.schema import Schema
from sampletok.tokenizers.iat import IATSourceConfig, SourceModel
from sampletok.tokens.iat import export_to_store
from sampletok.tokens.sif import export_codes

HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def ms_log(tmp_path_factory):
    """Two users; each event is followed by one 5 s later and one 2 h later (timestamps in ms)."""
    rows = []
    for u in range(2):
        for k in range(6):
            base = u * 10 * HOUR_MS + k * 3 * HOUR_MS
            for off in (0, 5_000, 2 * HOUR_MS):
                rows.append({"uid": u, "ts": base + off, "iid": (k * 3 + off // 1000) % 17, "click": k % 2, "buy": 1})
    df = pl.DataFrame(rows).unique(subset=["uid", "ts"], keep="first", maintain_order=True)
    schema = Schema.model_validate(
        {
            "name": "ms",
            "user": "uid",
            "timestamp": "ts",
            "timestamp_unit": "ms",
            "item": "iid",
            "labels": [{"name": "click"}],
            "responses": [{"name": "buy", "delay": 3600}],
            "features": [
                {"name": "uid", "type": "categorical", "group": "user"},
                {"name": "iid", "type": "categorical", "group": "item"},
            ],
            "sequence": {"fields": ["iid"], "max_len": 8},
        }
    )
    return prepare(FrameSource(df, "ms"), schema, tmp_path_factory.mktemp("ms") / "ds", progress=False)


def _expected_known(ds, users, req_ts, n):
    """Reference: buy of a past row is known iff ts_row + 3600 s (in ms) < request ts."""
    h = history_index(ds).fetch(users, req_ts, n)
    ts = np.asarray(ds.col("_ts"))
    row_ts = ts[np.where(h.mask, h.rows, 0)]
    return h, h.mask & (row_ts + HOUR_MS < req_ts[:, None])


def test_delay_is_seconds_on_an_ms_log(ms_log):
    assert ms_log.schema.response_delays() == [0, HOUR_MS]
    ds = ms_log
    rows = np.arange(ds.n_rows)
    users, ts = np.asarray(ds.col("_user_key"))[rows], np.asarray(ds.col("_ts"))[rows]
    h, known = _expected_known(ds, users, ts, 8)
    # a row 5 s before a request is in its history, but its 1-hour label is not yet known
    assert (h.mask & ~known).any() and known.any()
    np.testing.assert_array_equal(h.response_mask[:, :, 1], known)
    batch = BatchLoader(ds, rows, len(rows), hist_len=8).build(rows)
    np.testing.assert_array_equal(batch.hist_response_mask[:, :, 1].numpy(), known)
    assert (batch.hist_responses[:, :, 1].numpy()[~known] == 0).all()


def test_iat_and_sif_stores_use_the_same_availability(ms_log, tmp_path):
    ds = ms_log
    rows = np.arange(ds.n_rows)
    users, ts = np.asarray(ds.col("_user_key")), np.asarray(ds.col("_ts"))
    _, known = _expected_known(ds, users, ts, 8)
    layout = FeatureLayout.from_dataset(ds)
    src = SourceModel(
        layout,
        IATSourceConfig(scheme="user", epochs=1, hidden=[8], decompress=[8], emb_dim=4, window=4, dtype="float32"),
    )
    iat_store = export_to_store(src.eval(), ds, tmp_path / "iat", progress=False)
    sif = build_model("sif", layout, hgaq={"fields_per_token": 2, "codes": 8}, width=8, blocks=1, heads=1)
    sif_store = export_codes(sif.eval(), ds, tmp_path / "sif", progress=False)
    for store in (iat_store, sif_store):
        known_at = np.asarray(store.load_into_memory().columns()["known_at"])
        store_ts = np.asarray(store.columns()["ts"])
        np.testing.assert_array_equal(known_at[:, 1], store_ts + HOUR_MS)
        f = store.fetch(users[rows], ts[rows], 8)
        np.testing.assert_array_equal(f.response_mask[:, :, 1], known)


def test_history_gaps_are_seconds_on_an_ms_log(ms_log, tmp_path):
    ds = ms_log
    rows = np.arange(ds.n_rows)
    b = BatchLoader(ds, rows, len(rows), hist_len=8).build(rows)
    ts = np.asarray(ds.col("_ts"))
    m = b.hist_mask.numpy()
    want = (b.ts.numpy()[:, None] - ts[np.where(m, b.hist_rows.numpy(), 0)]) / 1000.0
    np.testing.assert_allclose(b.hist_gap.numpy()[m], want[m], rtol=1e-6)
    assert b.hist_gap.numpy()[m].min() >= 5.0 - 1e-6  # the 5 s neighbour, not 5,000
    src = SourceModel(
        FeatureLayout.from_dataset(ds),
        IATSourceConfig(scheme="temporal", epochs=1, hidden=[8], decompress=[8], emb_dim=4, dtype="float32"),
    )
    store = export_to_store(src.eval(), ds, tmp_path / "iat", progress=False)
    f = store.fetch(b.user.numpy(), b.ts.numpy(), 8)
    np.testing.assert_allclose(f.gap[f.mask], b.hist_gap.numpy()[m], rtol=1e-6)
