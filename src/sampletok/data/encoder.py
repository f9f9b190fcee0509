"""The fitted encoder of a prepared dataset: its vocabularies and normalization statistics, applied to raw rows
outside ``prepare`` (a serving request, a streamed event) with exactly the codes ``prepare`` gives.

It is the same function as prepare's encode pass (:func:`~sampletok.data.codec.encode_chunk`) over the
same fitted state, so the two cannot drift; a test checks equality on every row of ml-100k.

Example:
    >>> from sampletok.data.sources.synthetic import SyntheticConfig, generate_source
    >>> from sampletok.data.prepare import prepare
    >>> import tempfile
    >>> src, schema = generate_source(SyntheticConfig(n_users=20, events_per_user=5, n_items=30))
    >>> ds = prepare(src, schema, tempfile.mkdtemp(), progress=False)
    >>> enc = Encoder.from_dataset(ds)
    >>> request = {**next(src.iter_chunks()).frame.row(0, named=True), "item_id": "never-seen"}
    >>> codes = enc.encode(request)
    >>> int(codes["cat__item_id"][0]) == ds.vocab_size("item_id") - 1  # an unseen value is OOV
    True
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from sampletok.data.codec import (
    RECORDS_MAX_ROWS,
    FieldStats,
    encode_chunk,
    encode_records,
    response_vocab_size,
    vocab_lookups,
)
from sampletok.data.dataset import PreparedDataset
from sampletok.data.sources.files import RawChunk
from sampletok.errors import DataError, one_line
from sampletok.schema import Schema

RawRows = Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | pl.DataFrame | Any  # Any: a pyarrow table/batch


class Encoder:
    """Encodes raw rows with a prepared dataset's fitted vocabularies and statistics.

    Args:
        schema: the dataset's schema.
        stats: the fitted state (:attr:`PreparedDataset.stats`).
    """

    def __init__(self, schema: Schema, stats: dict[str, FieldStats], kernel: Literal["auto", "polars"] = "auto"):
        self.schema, self.stats, self.kernel = schema, stats, kernel
        self._lookup = vocab_lookups(stats)

    @classmethod
    def from_dataset(cls, ds: PreparedDataset) -> Encoder:
        return cls(ds.schema, ds.stats)

    @classmethod
    def from_manifest(cls, path: str | Path) -> Encoder:
        """From a prepared dataset's folder (only its manifest is read: no column is loaded)."""
        return cls.from_dataset(PreparedDataset(path))

    # what FeatureLayout.from_dataset reads: a layout can be built from an encoder alone (a serving process)
    def vocab_size(self, field_name: str) -> int:
        return self.stats[field_name].vocab_size

    def response_vocab_size(self, name: str) -> int:
        return response_vocab_size(self.schema, self.stats, name)

    def encode(
        self,
        rows: RawRows,
        *,
        outcomes: bool = False,
        strict: bool = True,
        origin: str = "request",
        fields: Collection[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Prepared columns (``cat__``, ``num__``, ``multi__``; with ``outcomes`` also ``label__``, ``resp__``,
        ``known__``) of one row (a dict), several (a list of dicts, a JSON object or array, a polars
        DataFrame, a pyarrow Table or RecordBatch). ``strict``: a column the schema does not know is an error
        naming it (serving rejects misspelled fields); a missing feature column is an error, except that
        ``strict=False`` encodes a missing categorical one as null (padding); a missing numeric one stays an
        error unless its ``nan_policy`` is fill. ``fields``: encode (and require) only these features, as the
        full-row call would encode them (the served path encodes a request's shared fields once).

        ``kernel`` (the constructor's): ``auto`` encodes the features of at most ``RECORDS_MAX_ROWS`` dict rows
        in plain Python (:func:`~sampletok.data.codec.encode_records`, no polars call: a served request),
        falling back to the polars reference for a cell it does not take; ``polars`` always uses the reference."""
        if fields is not None and outcomes:
            raise ValueError("fields selects features of request rows; an event (outcomes) is encoded whole")
        if self.kernel == "auto" and not outcomes:
            records = [rows] if isinstance(rows, Mapping) else rows
            if isinstance(records, list) and 0 < len(records) <= RECORDS_MAX_ROWS:
                fast = self._encode_records(records, strict, origin, fields)
                if fast is not None:
                    return fast
        frame = self._frame(rows, origin)
        need = [f.name for f in self.schema.features if fields is None or f.name in fields]
        if outcomes:
            need += self.schema.response_names + [r.known_at for r in self.schema.responses if r.known_at]
            if any(r.known_at for r in self.schema.responses):
                need.append(self.schema.timestamp)
        known = set(self.schema.raw_columns)
        unknown = [c for c in frame.columns if c not in known]
        if unknown and strict and not self.schema.allow_extra_columns:
            raise DataError(origin, f"unknown field(s) {unknown}; the schema has {sorted(known)}")
        missing = [c for c in need if c not in frame.columns]
        if missing and (strict or outcomes):
            raise DataError(origin, f"missing field(s) {missing}")
        if missing:
            frame = frame.with_columns([pl.lit(None, dtype=pl.Utf8).alias(c) for c in missing])
        chunk = RawChunk(origin=origin, first_row=1, frame=frame)
        try:
            return encode_chunk(chunk, self.schema, self.stats, self._lookup, outcomes=outcomes, features=fields)
        except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError) as e:  # a cell of another shape
            raise DataError(origin, f"cannot encode the rows ({type(e).__name__}: {one_line(e)[:200]})") from None

    def _encode_records(
        self, records: list, strict: bool, origin: str, fields: Collection[str] | None
    ) -> dict[str, np.ndarray] | None:
        """The plain-Python kernel's codes of dict rows, with the reference's column checks; None: use it."""
        if not all(isinstance(r, Mapping) for r in records):
            return None
        columns = {k for r in records for k in r}
        known = set(self.schema.raw_columns)
        unknown = sorted(c for c in columns if c not in known)
        if unknown and strict and not self.schema.allow_extra_columns:
            raise DataError(origin, f"unknown field(s) {unknown}; the schema has {sorted(known)}")
        need = [f.name for f in self.schema.features if fields is None or f.name in fields]
        missing = [c for c in need if c not in columns]
        if missing and strict:
            raise DataError(origin, f"missing field(s) {missing}")
        return encode_records(records, origin, self.schema, self.stats, self._lookup, features=fields)

    def _frame(self, rows: RawRows, origin: str) -> pl.DataFrame:
        if isinstance(rows, pl.DataFrame):
            return rows
        if isinstance(rows, str):
            try:
                rows = json.loads(rows)
            except json.JSONDecodeError as e:
                raise DataError(origin, f"not JSON: {e}") from None
        if isinstance(rows, Mapping):
            rows = [rows]
        if isinstance(rows, Sequence) and not isinstance(rows, str | bytes):
            records = [r for r in rows if isinstance(r, Mapping)]
            if len(records) != len(rows):
                raise DataError(origin, "rows must be objects (field: value)")
            # every value as given; cells are typed by the encoding (as CSV cells are), strings stay strings
            columns = sorted({k for r in records for k in r})
            cells = {c: [r.get(c) for r in records] for c in columns}
            series = []
            for c, v in cells.items():
                try:
                    series.append(pl.Series(c, v, dtype=_column_dtype(v), strict=False))
                except (TypeError, ValueError, OverflowError, pl.exceptions.PolarsError) as e:  # lists and numbers
                    why = f"{type(e).__name__}: {one_line(e)[:200]}"
                    raise DataError(origin, f"cannot read the cells ({why})", c) from None
            return pl.DataFrame(series)
        try:
            out = pl.from_arrow(rows)  # a pyarrow Table or RecordBatch
        except (TypeError, ValueError) as e:
            raise DataError(origin, f"cannot read rows of type {type(rows).__name__}: {e}") from None
        if not isinstance(out, pl.DataFrame):
            raise DataError(origin, f"cannot read rows of type {type(rows).__name__}")
        return out


def _column_dtype(values: list) -> pl.DataType | type[pl.DataType]:
    """A polars dtype that keeps JSON values as they are: lists of strings, mixed numbers and strings as strings."""
    present = [v for v in values if v is not None]
    if any(isinstance(v, list) for v in present):
        return pl.List(pl.Utf8)
    if present and all(isinstance(v, bool) for v in present):
        return pl.Boolean
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return pl.Float64 if any(isinstance(v, float) for v in present) else pl.Int64
    return pl.Utf8
