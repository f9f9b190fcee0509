"""The fitted codec of a prepared dataset: vocabularies (0 padding, 1..V by training frequency, V+1 OOV) and
numeric normalizations learnt on the training window, and :func:`encode_chunk`, the one function that turns raw
rows into prepared codes: prepare's encode pass, its Ray tasks and the serving Encoder all call it."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import polars as pl

from sampletok.columns import cat_col, known_col, label_col, multi_col, num_col, resp_col
from sampletok.data.cells import as_float, as_str, list_cells, parse_timestamp, row_of
from sampletok.data.sources.files import RawChunk
from sampletok.errors import DataError
from sampletok.schema import FeatureField, FieldType, ResponseSpec, Schema


@dataclass
@dataclass
class FieldStats:
    """What pass 2 learns about one field on the training window."""

    vocab: list[str] | None = None  # categorical: values by descending train frequency
    mean: float = 0.0
    std: float = 1.0
    edges: list[float] | None = None  # bucketize: interior quantile edges

    @property
    def vocab_size(self) -> int:
        """Table size: 0 padding, 1..len(vocab) known values, len(vocab)+1 OOV."""
        if self.edges is not None:
            return len(self.edges) + 3
        return len(self.vocab) + 2 if self.vocab is not None else 0


def transform_numeric(x: np.ndarray, f: FeatureField | ResponseSpec) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x)) if f.normalize == "log_standard" else x


def check_finite(chunk: RawChunk, f: FeatureField | ResponseSpec, x: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(x)
    if bad.any():
        if f.nan_policy == "error":
            raise DataError(
                chunk.origin,
                f"missing or non-finite value {float(x[bad][0])!r} (nan_policy: fill fills it)",
                f.name,
                row_of(chunk, bad),
            )
        x = np.where(bad, f.fill_value, x)
    return x


def response_and_feature_columns(schema: Schema) -> list[str]:
    """The raw columns the encode pass reads: labels, responses (and their known-at times), features."""
    known_cols = [r.known_at for r in schema.responses if r.known_at]
    response_cols = [r.name for r in schema.responses] + known_cols + ([schema.timestamp] if known_cols else [])
    return [l.name for l in schema.labels] + response_cols + [f.name for f in schema.features]


def response_vocab_size(schema: Schema, stats: dict[str, FieldStats], name: str) -> int:
    """Embedding-table size of a categorical (or bucketized) response; 0 for a task label or a value response."""
    if name in schema.task_labels or not schema.response(name).is_categorical_like:
        return 0
    return stats[name].vocab_size


class VocabLookup:
    """value → code of one fitted vocabulary: a join table for chunks of a log, and a dict for the few rows
    of a served request (where polars' fixed cost per call, ~1 ms a field, would dominate)."""

    SMALL = 256  # at most this many values: the dict

    def __init__(self, vocab: list[str]):
        self.vocab = vocab
        self.frame = _vocab_frame(vocab)
        self._codes: dict[str, int] | None = None

    @property
    def codes(self) -> dict[str, int]:
        if self._codes is None:
            self._codes = {v: i + 1 for i, v in enumerate(self.vocab)}
        return self._codes


def vocab_lookups(stats: dict[str, FieldStats]) -> dict[str, VocabLookup]:
    """The lookups of every fitted vocabulary (features and categorical responses)."""
    return {name: VocabLookup(st.vocab) for name, st in stats.items() if st.vocab is not None}


def encode_chunk(
    chunk: RawChunk,
    schema: Schema,
    stats: dict[str, FieldStats],
    lookup: dict[str, VocabLookup],
    outcomes: bool = True,
    features: Collection[str] | None = None,
) -> dict[str, np.ndarray]:
    """Every column of a chunk of raw rows as prepared codes (``label__``, ``resp__``, ``known__``, ``cat__``,
    ``num__``, ``multi__``), with the fitted vocabularies and statistics: the one encoding function of both
    ``prepare`` and :class:`~sampletok.data.encoder.Encoder`. ``outcomes=False`` encodes features only (a
    request has no labels yet); ``features`` encodes only those features (a request's shared fields once, its
    candidates' apart). Bad cells raise a one-line DataError naming the chunk's origin, column, row."""
    out: dict[str, np.ndarray] = {}
    if outcomes:
        for lab in schema.task_labels:
            y = as_float(chunk, lab)
            bad = ~np.isfinite(y)
            if bad.any():
                raise DataError(chunk.origin, "label is not a finite number", lab, row_of(chunk, bad))
            bad = (y < 0) | (y > 1)  # a task label is a BCE target: a probability
            if bad.any():
                raise DataError(chunk.origin, f"label {float(y[bad][0])} is not in [0, 1]", lab, row_of(chunk, bad))
            out[label_col(lab)] = y
        if any(r.known_at for r in schema.responses):
            row_ts = parse_timestamp(chunk, schema.timestamp, schema.timestamp_unit)
        for r in schema.responses:
            out[resp_col(r.name)] = _encode_response(chunk, r, stats.get(r.name), lookup.get(r.name))
            if r.known_at:
                known = parse_timestamp(chunk, r.known_at, schema.timestamp_unit, null_is_never=True)
                early = known < row_ts
                if early.any():
                    msg = f"response '{r.name}' is known before its event (known_at < {schema.timestamp})"
                    raise DataError(chunk.origin, msg, r.known_at, row_of(chunk, early))
                out[known_col(r.name)] = known
    for f in schema.features:
        if features is not None and f.name not in features:
            continue
        st = stats[f.name]
        if f.type == FieldType.numeric:
            out.update(_numeric_codes(chunk, f, st, as_float(chunk, f.name, allow_null=True)))
        elif f.type == FieldType.categorical:
            out[cat_col(f.name)] = _encode(as_str(chunk, f.name), lookup[f.name], st.vocab_size - 1)
        else:
            out[multi_col(f.name)] = _encode_lists(list_cells(chunk, f), lookup[f.name], st.vocab_size - 1, f.max_len)
    return out


def _numeric_codes(chunk: RawChunk, f: FeatureField, st: FieldStats, x: np.ndarray) -> dict[str, np.ndarray]:
    """A numeric feature's column (float64, NaN for a missing cell) as its prepared column: normalized, or
    bucket codes."""
    x = transform_numeric(check_finite(chunk, f, x), f)
    if f.normalize == "bucketize":
        return {cat_col(f.name): np.searchsorted(np.asarray(st.edges), x, side="right") + 1}
    return {num_col(f.name): x if f.normalize == "none" else (x - st.mean) / st.std}


RECORDS_MAX_ROWS = 4096  # the plain-Python kernel is faster than polars' fixed costs up to ~3,000 ml-100k rows
_EXACT_INT = 2**53  # |v| below it: a float's integer value is exact, and str(int(v)) is what polars writes


def encode_records(
    records: Sequence[Mapping[str, Any]],
    origin: str,
    schema: Schema,
    stats: dict[str, FieldStats],
    lookup: dict[str, VocabLookup],
    features: Collection[str] | None = None,
) -> dict[str, np.ndarray] | None:
    """The features of a few raw rows given as dicts (a served request) as :func:`encode_chunk` encodes them
    from a frame, in plain Python: no polars call, whose fixed cost per field (~0.1-1 ms) would be most of a
    request's encoding. It takes only cells whose text it writes exactly as polars does (strings, integers,
    integral floats, numbers for numeric fields, lists of strings or delimited strings for multi-categorical
    ones, nulls); anything else (a bool, a numeric string, a non-integral float in a categorical field)
    returns None, and the caller encodes with :func:`encode_chunk`, the reference (a property test checks the
    two agree on values and errors)."""
    chunk = RawChunk(origin=origin, first_row=1, frame=_NO_FRAME)  # names the origin and row in an error
    wanted = [f for f in schema.features if features is None or f.name in features]
    cells: dict[str, list] = {}
    for f in wanted:  # every column first: one the kernel does not take sends the whole call to the reference
        values = [r.get(f.name) for r in records]
        if f.type == FieldType.numeric:
            ok = all(v is None or type(v) is float or (type(v) is int and -(2**63) <= v < 2**63) for v in values)
            taken: list | None = values if ok else None  # not: a bool, a numeric string, an int beyond int64
        elif f.type == FieldType.categorical:
            taken = _categorical_text(values)
        else:
            taken = _list_text(values, f.separator)
        if taken is None:
            return None
        cells[f.name] = taken
    out: dict[str, np.ndarray] = {}
    for f in wanted:
        st, values = stats[f.name], cells[f.name]
        if f.type == FieldType.numeric:
            x = np.array([np.nan if v is None else v for v in values], np.float64)
            out.update(_numeric_codes(chunk, f, st, x))
            continue
        codes_of, oov = lookup[f.name].codes, st.vocab_size - 1
        if f.type == FieldType.categorical:
            out[cat_col(f.name)] = np.array([0 if v is None else codes_of.get(v, oov) for v in values], np.int32)
            continue
        codes = np.zeros((len(values), f.max_len), np.int32)
        for i, cell in enumerate(values):
            kept = [codes_of.get(v, oov) for v in cell[: f.max_len]]
            codes[i, : len(kept)] = kept
        out[multi_col(f.name)] = codes
    return out


_NO_FRAME = pl.DataFrame()


def _categorical_text(values: list) -> list[str | None] | None:
    """A categorical column's cells as :func:`~sampletok.data.cells.as_str` writes them, or None when they
    are not all strings (and nulls) or all numbers that are whole (polars' text for 3.0 in a column with 3.5
    is "3.0", for a mixed column of strings and numbers its own)."""
    present = [v for v in values if v is not None]
    if all(type(v) is str for v in present):
        return values
    if not all(type(v) is int or type(v) is float for v in present):
        return None
    if any(type(v) is float for v in present) and any(type(v) is int and abs(v) >= _EXACT_INT for v in present):
        return None  # polars makes the column Float64: such an int is rounded first
    out: list[str | None] = []
    for v in values:
        if v is None or (type(v) is float and v != v):  # NaN: as_str's integer cast makes it null
            out.append(None)
        elif type(v) is int and -(2**63) <= v < 2**63:
            out.append(str(v))
        elif type(v) is float and abs(v) < _EXACT_INT and v == int(v):  # inf fails the first test
            out.append(str(int(v)))
        else:
            return None
    return out


def _list_text(values: list, separator: str) -> list[list[str]] | None:
    """A multi-categorical column's cells as :func:`~sampletok.data.cells.list_cells` gives them (empty
    strings dropped, a null an empty cell), or None unless every present cell is a list of strings or every
    one a delimited string."""
    present = [v for v in values if v is not None]
    if all(type(v) is list and all(type(x) is str for x in v) for v in present):
        return [[x for x in v if x] if v is not None else [] for v in values]
    if separator and all(type(v) is str for v in present):
        return [[x for x in v.split(separator) if x] if v is not None else [] for v in values]
    return None


def _encode_response(chunk: RawChunk, r: ResponseSpec, st: FieldStats | None, vocab: VocabLookup | None) -> np.ndarray:
    """A response column as float32: 0/1 (binary), the normalized value (numeric) or the vocabulary code
    (categorical, bucketized numeric)."""
    if r.type == "categorical":
        assert st is not None and vocab is not None
        values = as_str(chunk, r.name)
        if values.null_count():
            raise DataError(chunk.origin, "missing value", r.name, row_of(chunk, values.is_null().to_numpy()))
        return _encode(values, vocab, st.vocab_size - 1).astype(np.float32)
    x = as_float(chunk, r.name)
    bad = ~np.isfinite(x) if r.type == "numeric" else ~np.isin(x, (0.0, 1.0))
    if bad.any():
        what = "not a finite number" if r.type == "numeric" else f"binary response is {float(x[bad][0])}, not 0 or 1"
        raise DataError(chunk.origin, what, r.name, row_of(chunk, bad))
    if r.type == "binary":
        return x.astype(np.float32)
    assert st is not None
    x = transform_numeric(x, r)
    if r.normalize == "bucketize":
        return (np.searchsorted(np.asarray(st.edges), x, side="right") + 1).astype(np.float32)
    return (x if r.normalize == "none" else (x - st.mean) / st.std).astype(np.float32)


def _vocab_frame(vocab: list[str]) -> pl.DataFrame:
    return pl.DataFrame(
        {"value": pl.Series(vocab, dtype=pl.Utf8), "code": pl.Series(np.arange(1, len(vocab) + 1, dtype=np.int32))}
    )


def _encode(values: pl.Series, vocab: VocabLookup, oov: int) -> np.ndarray:
    """Codes of string values: 0 for null, 1..V for known values, ``oov`` otherwise (one join; a dict lookup
    for a few values, with the same result: a test checks both on every ml-100k row)."""
    if len(values) <= VocabLookup.SMALL:
        codes_of = vocab.codes
        return np.array([0 if v is None else codes_of.get(v, oov) for v in values.to_list()], np.int32)
    df = pl.DataFrame({"value": values}).with_row_index("i").join(vocab.frame, on="value", how="left")
    df = df.sort("i")
    codes = df.get_column("code").fill_null(oov).to_numpy().astype(np.int32)
    codes[values.is_null().to_numpy()] = 0
    return codes


def _encode_lists(cells: pl.Series, vocab: VocabLookup, oov: int, max_len: int) -> np.ndarray:
    """[n, max_len] codes of list cells (first max_len values, 0-padded), via Arrow's flat values + offsets."""
    n = len(cells)
    arr = cells.list.head(max_len).to_arrow()
    if hasattr(arr, "combine_chunks"):
        arr = arr.combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    lens = np.diff(offsets)
    lens[np.asarray(arr.is_null())] = 0
    # an Arrow array (not a table) converts to a Series
    flat = cast(pl.Series, pl.from_arrow(arr.flatten())) if len(arr.flatten()) else pl.Series([], dtype=pl.Utf8)
    flat_codes = _encode(flat.cast(pl.Utf8), vocab, oov)
    row = np.repeat(np.arange(n), lens)
    pos = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    out = np.zeros((n, max_len), dtype=np.int32)
    out[row, pos] = flat_codes[np.repeat(offsets[:-1], lens) + pos]
    return out
