"""The event store: each raw sample's encoded features, packed into one int32 row, with its responses and
the time each becomes known, in any :class:`~sampletok.store.base.TokenStore` backend (keyed by the stable
user key). It is what a served request's history is built from: the same columns, in the same layout, that
the offline loader gathers from the prepared dataset, so a model reads the same history online and offline.

A row packs the categorical codes, the multi-categorical codes (padded to the layout's length) and the
numerics as their float32 bit patterns (bit-exact, no rounding) — one dtype, so one store holds it all.

Example:
    >>> import numpy as np
    >>> from sampletok.features import FeatureLayout
    >>> from sampletok.data.sources.synthetic import SyntheticConfig, generate_source
    >>> from sampletok.data.prepare import prepare
    >>> import tempfile
    >>> src, schema = generate_source(SyntheticConfig(n_users=20, events_per_user=5, n_items=30))
    >>> ds = prepare(src, schema, tempfile.mkdtemp(), progress=False)
    >>> codec = EventCodec(FeatureLayout.from_dataset(ds))
    >>> packed = codec.pack(codec.columns_of(ds, np.arange(3)))
    >>> cat, multi, num = codec.unpack(packed)
    >>> bool((num[:, 0] == np.asarray(ds.col(num_col(codec.layout.num_fields[0].name)))[:3]).all())
    True
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sampletok.columns import INSTANCE_ID, TIMESTAMP, USER_KEY, cat_col, multi_col, num_col
from sampletok.data.dataset import PreparedDataset
from sampletok.errors import StoreError
from sampletok.features import FeatureLayout
from sampletok.store.base import TokenStore
from sampletok.store.locations import create_store, open_store

EVENTS_KIND = "events"


class EventCodec:
    """Packs encoded feature columns (``cat__``/``multi__``/``num__``, as prepare writes them and the
    :class:`~sampletok.data.encoder.Encoder` returns them) into [k, P] int32 rows and back."""

    def __init__(self, layout: FeatureLayout):
        self.layout = layout
        self.n_cat, self.n_multi, self.n_num = len(layout.cat_fields), len(layout.multi_fields), len(layout.num_fields)
        self.width = self.n_cat + self.n_multi * layout.multi_len + self.n_num

    @property
    def signature(self) -> list[str]:
        """What a store's rows mean: the field columns in packed order (checked when a store is opened)."""
        lay = self.layout
        return (
            [cat_col(f.name) for f in lay.cat_fields]
            + [f"multi__{f.name}[{lay.multi_len}]" for f in lay.multi_fields]
            + [num_col(f.name) for f in lay.num_fields]
        )

    def columns_of(self, ds: PreparedDataset, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The encoded feature columns of dataset rows."""
        lay = self.layout
        cols = [cat_col(f.name) for f in lay.cat_fields] + [num_col(f.name) for f in lay.num_fields]
        cols += [multi_col(f.name) for f in lay.multi_fields]
        return {c: np.asarray(ds.col(c))[rows] for c in cols}

    def pack(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        lay = self.layout
        k = len(next(iter(columns.values()))) if columns else 0
        out = np.zeros((k, self.width), np.int32)
        for i, f in enumerate(lay.cat_fields):
            out[:, i] = columns[cat_col(f.name)]
        for i, f in enumerate(lay.multi_fields):
            m = np.asarray(columns[multi_col(f.name)])
            start = self.n_cat + i * lay.multi_len
            out[:, start : start + m.shape[1]] = m
        num0 = self.n_cat + self.n_multi * lay.multi_len
        for i, f in enumerate(lay.num_fields):
            out[:, num0 + i] = np.asarray(columns[num_col(f.name)], np.float32).view(np.int32)
        return out

    def unpack(self, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[..., P] packed rows → (cat [..., F_c] int64, multi [..., F_m, L_m] int64, num [..., F_n] float32)."""
        lead = packed.shape[:-1]
        lay = self.layout
        p = np.ascontiguousarray(packed, np.int32)
        cat = p[..., : self.n_cat].astype(np.int64)
        num0 = self.n_cat + self.n_multi * lay.multi_len
        multi = p[..., self.n_cat : num0].reshape(*lead, self.n_multi, lay.multi_len).astype(np.int64)
        num = np.ascontiguousarray(p[..., num0:]).view(np.float32)
        return cat, multi, num


def events_meta(ds: PreparedDataset, codec: EventCodec) -> dict:
    return {
        "kind": EVENTS_KIND,
        "dataset": ds.fingerprint,
        "ticks_per_second": ds.schema.ticks_per_second,
        "fields": codec.signature,
    }


def export_events(
    ds: PreparedDataset,
    location: str | Path,
    overwrite: bool = False,
    before_ts: int | None = None,
    chunk: int = 1 << 18,
) -> TokenStore:
    """Every row of a prepared dataset (with ``ts < before_ts`` when given) into a new event store at
    ``location`` (a directory or a ``redis://`` URL), committed at once when complete: the history a service
    starts from."""
    codec = EventCodec(FeatureLayout.from_dataset(ds))
    store = create_store(
        location,
        producer=f"events-{ds.fingerprint}",
        payload_shape=(codec.width,),
        response_names=ds.schema.response_names,
        dtype="int32",
        extra_meta=events_meta(ds, codec),
        overwrite=overwrite,
    )
    iid, user, ts = (np.asarray(ds.col(c)) for c in (INSTANCE_ID, USER_KEY, TIMESTAMP))
    responses = np.stack([np.asarray(ds.response_column(r), np.float32) for r in ds.schema.response_names], 1)
    known_at = ds.response_available_at()
    keep = np.arange(ds.n_rows) if before_ts is None else np.flatnonzero(ts < before_ts)
    for start in range(0, len(keep), chunk):
        rows = keep[start : start + chunk]
        store.append(
            iid[rows], user[rows], ts[rows], codec.pack(codec.columns_of(ds, rows)), responses[rows], known_at[rows]
        )
    store.commit()
    return store


def open_events(location: str | Path, ds_fingerprint: str, codec: EventCodec) -> TokenStore:
    """The committed event store at ``location``, refused unless it holds this dataset's packed fields."""
    store = open_store(location)
    meta = store.meta
    if meta.get("kind") != EVENTS_KIND or meta.get("fields") != codec.signature:
        raise StoreError(f"{location}: not an event store of this schema's fields")
    if meta.get("dataset") != ds_fingerprint:
        raise StoreError(f"{location}: event store of dataset {meta.get('dataset')}, not {ds_fingerprint}")
    return store
