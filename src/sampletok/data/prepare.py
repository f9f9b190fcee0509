"""Chunked encoding of a raw-sample log into a memory-mapped :class:`PreparedDataset`.

Three streaming passes over the source, each holding one chunk at a time (plus per-row keys of 17 bytes):

1. *scan*: user key, timestamp, instance id → time-ordered split and dense user codes;
2. *fit*: vocabularies (frequency-ordered, 0 = padding, last = OOV) and numeric statistics, on the training
   window only;
3. *encode*: every column into ``.npy`` files opened with ``np.lib.format.open_memmap``.

Everything is written to a temporary directory that is renamed into place at the end, so a crash never leaves a
half-written dataset. Re-preparation is skipped when the source, schema and split are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sampletok.data.sources.files import RawChunk, RawSource
from sampletok.errors import ConfigError, DataError
from sampletok.schema import FeatureField, FieldType, ResponseSpec, Schema

PREP_VERSION = 2  # 2: _user_key is the stable hash of the raw user id
SPLIT_NAMES = ("train", "valid", "test")
_MAX_BUCKET_SAMPLE = 1_000_000


class SplitSpec(BaseModel):
    """Time-ordered split. Either fractions of rows after a stable sort by timestamp (ties keep file order), or
    explicit timestamp cut points ``[valid_start, test_start]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    train: float = Field(0.8, gt=0)
    valid: float = Field(0.1, ge=0)
    test: float = Field(0.1, ge=0)
    cut_ts: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _sum(self) -> SplitSpec:
        if self.cut_ts is None and not math.isclose(self.train + self.valid + self.test, 1.0, abs_tol=1e-6):
            raise ValueError("train + valid + test must be 1")
        if self.cut_ts is not None and self.cut_ts[0] > self.cut_ts[1]:
            raise ValueError("cut_ts must be increasing")
        return self


def assign_splits(ts: np.ndarray, spec: SplitSpec) -> np.ndarray:
    """Split code per row (0 train, 1 valid, 2 test), by time only."""
    n = len(ts)
    out = np.empty(n, dtype=np.int8)
    if spec.cut_ts is not None:
        out[:] = 0
        out[ts >= spec.cut_ts[0]] = 1
        out[ts >= spec.cut_ts[1]] = 2
        return out
    order = np.argsort(ts, kind="stable")
    n_train = int(round(n * spec.train))
    n_valid = int(round(n * spec.valid))
    out[order[:n_train]] = 0
    out[order[n_train : n_train + n_valid]] = 1
    out[order[n_train + n_valid :]] = 2
    return out


# ---------------------------------------------------------------------------------------------- column typing
def _where(chunk: RawChunk, mask: np.ndarray) -> int:
    """1-based row (within the chunk's origin) of the first True in mask."""
    return chunk.first_row + int(np.flatnonzero(mask)[0])


NEVER = np.iinfo(np.int64).max  # the known-at time of a response that never became known


def parse_timestamp(chunk: RawChunk, column: str, unit: str, *, null_is_never: bool = False) -> np.ndarray:
    """Column as int64 ticks of ``unit``; a null is an error, or :data:`NEVER` when ``null_is_never``."""
    s = chunk.frame.get_column(column)
    if s.null_count():
        null = s.is_null().to_numpy()
        if not null_is_never:
            raise DataError(chunk.origin, "null timestamp", column, _where(chunk, null))
        frame = chunk.frame.with_columns(s.fill_null(strategy="forward").fill_null(strategy="backward"))
        filled = RawChunk(origin=chunk.origin, first_row=chunk.first_row, frame=frame)
        if filled.frame.get_column(column).null_count():  # every cell null
            return np.full(len(s), NEVER, np.int64)
        out = np.array(parse_timestamp(filled, column, unit), np.int64)  # a writable copy
        out[null] = NEVER
        return out
    if s.dtype == pl.Utf8:
        as_int = s.str.strip_chars().cast(pl.Int64, strict=False)
        if as_int.null_count() < len(s):  # integer timestamps: any cell that is not one is bad
            bad = as_int.is_null().to_numpy()
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(chunk.origin, f"unparseable timestamp {s[i]!r}", column, chunk.first_row + i)
            return as_int.to_numpy()
        try:
            parsed = s.str.to_datetime(strict=False, time_unit="ms")
        except pl.exceptions.PolarsError:
            parsed = pl.Series([None] * len(s), dtype=pl.Datetime("ms"))
        bad = parsed.is_null().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(chunk.origin, f"unparseable timestamp {s[i]!r}", column, chunk.first_row + i)
        ms = parsed.dt.epoch("ms").to_numpy()
        return ms if unit == "ms" else ms // 1000
    if s.dtype in (pl.Datetime, pl.Date) or isinstance(s.dtype, pl.Datetime):
        ms = s.cast(pl.Datetime("ms")).dt.epoch("ms").to_numpy()
        return ms if unit == "ms" else ms // 1000
    if s.dtype.is_float():
        arr = s.to_numpy()
        bad = ~np.isfinite(arr) | (arr != np.floor(arr))
        if bad.any():
            msg = f"timestamp {arr[bad][0]!r} is not a whole number"
            raise DataError(chunk.origin, msg, column, _where(chunk, bad))
        return arr.astype(np.int64)
    if s.dtype.is_integer():
        return s.cast(pl.Int64).to_numpy()
    raise DataError(chunk.origin, f"timestamp has unsupported type {s.dtype}", column)


def as_float(chunk: RawChunk, column: str, *, allow_null: bool = False) -> np.ndarray:
    """Column as float64; a cell that is not a number is an error naming its row."""
    s = chunk.frame.get_column(column)
    if s.dtype == pl.Boolean:
        s = s.cast(pl.Int8)
    if s.dtype == pl.Utf8:
        cast = s.str.strip_chars().cast(pl.Float64, strict=False)
        bad = (cast.is_null() & s.is_not_null()).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(chunk.origin, f"expected a number, got {s[i]!r}", column, chunk.first_row + i)
        s = cast
    elif not s.dtype.is_numeric():
        raise DataError(chunk.origin, f"expected a number, column has type {s.dtype}", column)
    if s.null_count() and not allow_null:
        raise DataError(chunk.origin, "missing value", column, _where(chunk, s.is_null().to_numpy()))
    return s.cast(pl.Float64).fill_null(float("nan")).to_numpy()


def as_str(chunk: RawChunk, column: str) -> pl.Series:
    s = chunk.frame.get_column(column)
    if s.dtype.is_float():
        # 3.0 → "3" so CSV strings and parquet floats of integer ids agree
        f = s.to_numpy()
        if np.all(np.isnan(f) | (f == np.floor(f))):
            s = s.cast(pl.Int64, strict=False)
    return s.cast(pl.Utf8)


def _list_cells(chunk: RawChunk, f: FeatureField) -> pl.Series:
    s = chunk.frame.get_column(f.name)
    s = s.cast(pl.List(pl.Utf8)) if isinstance(s.dtype, pl.List) else s.cast(pl.Utf8).str.split(f.separator)
    return s.list.eval(pl.element().filter(pl.element().str.len_chars() > 0))  # "" is no value


# ---------------------------------------------------------------------------------------------- fitted state
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


@dataclass
class _FitAccumulator:
    counts: dict[str, Counter] = field(default_factory=dict)
    sums: dict[str, list[float]] = field(default_factory=dict)  # n, sum, sumsq
    samples: dict[str, list[np.ndarray]] = field(default_factory=dict)


def _transform_numeric(x: np.ndarray, f: FeatureField | ResponseSpec) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x)) if f.normalize == "log_standard" else x


def _check_finite(chunk: RawChunk, f: FeatureField | ResponseSpec, x: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(x)
    if bad.any():
        if f.nan_policy == "error":
            raise DataError(
                chunk.origin,
                f"missing or non-finite value {x[bad][0]!r} (nan_policy: fill fills it)",
                f.name,
                _where(chunk, bad),
            )
        x = np.where(bad, f.fill_value, x)
    return x


def user_keys(raw: pl.Series, origin: str = "request") -> np.ndarray:
    """[N] int64 stable key of each raw user id: the first 8 bytes of its BLAKE2b digest (of the id's text).

    Token stores and the history index are keyed by it, so a re-prepared log, a store exported from it and a
    serving request all name a user the same way (a dense code would change with every preparation). Hashed
    once per distinct user; two ids with one key (odds ~n²/2⁶⁴) are an error, never a silent merge.

    Example:
        >>> k = user_keys(pl.Series(["u1", "u2", "u1"]))
        >>> bool(k[0] == k[2] != k[1]), int(k[0]) == int(user_keys(pl.Series(["u1"]))[0])
        (True, True)
    """
    text = raw.cast(pl.Utf8)
    uniq, inverse = np.unique(text.to_numpy().astype(str), return_inverse=True)
    keys = np.fromiter(
        (int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little", signed=True) for u in uniq),
        np.int64,
        len(uniq),
    )
    if len(np.unique(keys)) != len(keys):
        raise DataError(origin, "two user ids hash to the same 64-bit key; rename one of them")
    return keys[inverse.reshape(-1)]


# ---------------------------------------------------------------------------------------------- the dataset
IN_MEMORY_MAX_ROWS = 20_000_000  # training runs load a dataset up to this size into RAM, memory-map larger ones


class PreparedDataset:
    """A prepared, memory-mapped dataset directory.

    Columns (all length N, in source row order):
      ``_user_key`` int64 stable hash of the raw user id (:func:`user_keys`: the same in every preparation
      and in a serving request), ``_ts`` int64, ``_instance_id`` int64, ``_split`` int8,
      ``label__<name>`` float32, ``resp__<name>`` float32 (0/1, normalized value or vocabulary code),
      ``known__<name>`` int64 (a response's known-at time), ``cat__<name>`` int32 codes,
      ``multi__<name>`` int32 [N, max_len], ``num__<name>`` float32 normalized.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.exists():
            raise DataError(str(self.root), "not a prepared dataset (no manifest.json); run `sampletok prepare`")
        try:
            self.manifest = json.loads(manifest.read_text())
            self.schema = Schema.model_validate(self.manifest["schema"])
            self.stats = {k: FieldStats(**v) for k, v in self.manifest["fields"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON, pydantic and shape errors
            raise DataError(
                str(manifest),
                f"unreadable manifest ({type(e).__name__}: {e}); prepare the dataset "
                "again with `sampletok prepare --force`",
            ) from None
        self._cols: dict[str, np.ndarray] = {}

    def col(self, name: str) -> np.ndarray:
        if name not in self._cols:
            self._cols[name] = np.load(self.root / "columns" / f"{name}.npy", mmap_mode="r")
        return self._cols[name]

    def load_into_memory(self, max_rows: int | None = None) -> PreparedDataset:
        """Replace memory maps by RAM arrays (faster random gathers for small datasets); a dataset of more than
        ``max_rows`` rows stays memory-mapped (its loaders then stack their columns in files, not in RAM)."""
        if max_rows is not None and self.n_rows > max_rows:
            return self
        for name in self.manifest["columns"]:
            self._cols[name] = np.ascontiguousarray(self.col(name))
        return self

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["key"]

    def where(self, conditions: dict[str, list] | None) -> np.ndarray:
        """Boolean row mask: every categorical field's raw value is one of the given values."""
        mask = np.ones(self.n_rows, dtype=bool)
        for name, values in (conditions or {}).items():
            vocab = self.stats[name].vocab if name in self.stats else None
            if vocab is None:
                raise DataError(str(self.root), f"row filter field '{name}' is not a categorical field")
            codes = [vocab.index(str(v)) + 1 for v in values if str(v) in vocab]
            mask &= np.isin(np.asarray(self.col(f"cat__{name}")), codes)
        return mask

    def rows(self, split: str, seen_users_only: bool = False, where: dict[str, list] | None = None) -> np.ndarray:
        """Row ids of a split, in time order (stable); ``where`` keeps rows whose fields take given values."""
        code = SPLIT_NAMES.index(split)
        rows = np.flatnonzero((np.asarray(self.col("_split")) == code) & self.where(where))
        if seen_users_only and split != "train":
            train_users = np.unique(np.asarray(self.col("_user_key"))[self.rows("train", where=where)])
            rows = rows[np.isin(np.asarray(self.col("_user_key"))[rows], train_users)]
        ts = np.asarray(self.col("_ts"))[rows]
        return rows[np.argsort(ts, kind="stable")]

    def vocab_size(self, field_name: str) -> int:
        return self.stats[field_name].vocab_size

    # ------------------------------------------------------------------ responses of past rows
    def response_column(self, name: str) -> np.ndarray:
        """[N] float32 values of one response (task labels included), as models read it on a past row."""
        return self.col(f"label__{name}" if name in self.schema.task_labels else f"resp__{name}")

    def response_vocab_size(self, name: str) -> int:
        """Embedding-table size of a categorical (or bucketized) response; 0 for one read as a value."""
        return response_vocab_size(self.schema, self.stats, name)

    def response_known_at(self) -> dict[int, np.ndarray]:
        """{response index: [N] int64 time it became known} for responses with a ``known_at`` column."""
        names = self.schema.response_names
        return {names.index(r.name): self.col(f"known__{r.name}") for r in self.schema.responses if r.known_at}

    def response_available_at(self, rows: np.ndarray | None = None) -> np.ndarray:
        """[N or len(rows), R] int64 time from which each response of each row is visible (strictly after)."""
        rows = np.arange(self.n_rows) if rows is None else np.asarray(rows)
        avail = np.asarray(self.col("_ts"))[rows, None] + np.array(self.schema.response_delays(), np.int64)[None]
        for k, known in self.response_known_at().items():
            avail[:, k] = np.asarray(known)[rows]
        return avail

    def feature_column(self, f: FeatureField) -> str:
        if f.type == FieldType.multi_categorical:
            return f"multi__{f.name}"
        return f"cat__{f.name}" if f.is_categorical_like else f"num__{f.name}"


def _source_key(source: RawSource, schema: Schema, split: SplitSpec) -> str:
    payload = json.dumps(
        {
            "v": PREP_VERSION,
            "src": source.fingerprint(),
            "schema": schema.fingerprint(),
            "split": split.model_dump(mode="json"),
            "polars": pl.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _check_columns(source: RawSource, schema: Schema) -> None:
    have = source.columns
    missing = [c for c in schema.raw_columns if c not in have]
    if missing:
        raise DataError(source.name, f"missing columns {missing} (schema '{schema.name}' needs them)")
    extra = [c for c in have if c not in schema.raw_columns]
    if extra and not schema.allow_extra_columns:
        raise DataError(source.name, f"unexpected columns {extra} (declare them or set allow_extra_columns: true)")


def prepare(
    source: RawSource,
    schema: Schema,
    out_dir: str | Path,
    split: SplitSpec | None = None,
    force: bool = False,
    progress: bool = True,
    frozen: PreparedDataset | None = None,
    engine: Literal["local", "ray"] = "local",
) -> PreparedDataset:
    """Encode ``source`` under ``schema`` into ``out_dir`` (skipped if already prepared from the same inputs).

    ``frozen``: take that dataset's fitted vocabularies and normalizations and its split's cut times instead of
    fitting them (what :func:`append` keeps; preparing old + new rows this way equals appending the new ones).
    ``engine="ray"``: the encode pass runs as a Ray Data job, one task per input file
    (:mod:`sampletok.data.ray_engine`; files sources only); the output is the same."""
    from tqdm.auto import tqdm

    split = split or SplitSpec()
    out_dir = Path(out_dir)
    _check_columns(source, schema)
    if frozen is not None:
        if frozen.schema.fingerprint() != schema.fingerprint():
            raise DataError(str(frozen.root), "frozen dataset was prepared under another schema")
        split = split_cut_times(frozen)
    key = (
        _source_key(source, schema, split)
        if frozen is None
        else _frozen_key(_source_key(source, schema, split), frozen)
    )
    if not force and (out_dir / "manifest.json").exists():
        try:
            existing = json.loads((out_dir / "manifest.json").read_text())
        except json.JSONDecodeError:
            existing = {}
        if existing.get("key") == key:
            return PreparedDataset(out_dir)
        if existing.get("appended"):  # rows appended since may be nowhere else: never replaced silently
            raise DataError(
                str(out_dir),
                "holds rows appended with `prepare --append`; prepare into another folder, or pass --force "
                "to replace it",
            )
    # the output is replaced whole at the end: never a file or a folder that is not a prepared dataset
    if (
        out_dir.exists()
        and not (out_dir / "manifest.json").exists()
        and (not out_dir.is_dir() or any(out_dir.iterdir()))
    ):
        raise DataError(
            str(out_dir),
            "exists and is not a prepared dataset (no manifest.json), so it is not "
            "replaced; prepare into a new or empty folder",
        )
    t0 = time.time()
    bar = tqdm(desc=f"prepare {schema.name}", unit="pass", total=3, disable=None if progress else True)

    with _staged(out_dir) as tmp:
        # ---- pass 1: keys, streamed to files in the staging folder
        keys = _read_keys(source, schema, tmp / "keys")
        origins = keys.origins
        keep, duplicates = _apply_duplicates_policy(keys.instance_id, origins, schema)
        ts_all, iid_all, user_key = keys.kept(keep)
        n = len(ts_all)
        split_code = assign_splits(ts_all, split)
        # split per source row (-1: a dropped duplicate), so passes 2 and 3 read the source as it is
        source_split = split_code
        if keep is not None:
            source_split = np.full(len(keep), -1, np.int8)
            source_split[keep] = split_code
        n_users = len(np.unique(user_key))
        example_users = keys.example_users()
        bar.update(1)

        # ---- pass 2: fit on the training window (or take the frozen dataset's fit)
        stats = _fit(source, schema, source_split, split_code) if frozen is None else dict(frozen.stats)
        bar.update(1)

        # ---- pass 3: encode into the staging folder, then rename it into place
        arrays = _open_outputs(tmp / "columns", schema, n)
        arrays["_user_key"][:] = user_key
        arrays["_ts"][:] = ts_all
        arrays["_instance_id"][:] = iid_all
        arrays["_split"][:] = split_code
        if engine == "ray":
            from sampletok.data.ray_engine import encode_with_ray
            from sampletok.data.sources.files import FileSource

            if not isinstance(source, FileSource):
                raise ConfigError("--engine ray reads files (a folder of Parquet partitions or CSV files)")
            for a in arrays.values():
                a.flush()  # the keys; the workers write the encoded columns into the same files
            row_counts: dict[str, int] = {}
            for origin, _, h in origins:
                row_counts[origin] = row_counts.get(origin, 0) + h
            encode_with_ray(source, schema, stats, source_split, tmp / "columns", row_counts)
        else:
            _encode_rows(source, schema, stats, source_split, arrays, 0)
        manifest = {
            "key": key,
            "prep_version": PREP_VERSION,
            "schema": schema.model_dump(mode="json"),
            "schema_hash": schema.fingerprint(),
            "source": source.name,
            "n_rows": n,
            "n_users": n_users,
            "example_users": example_users,
            **_row_summary(ts_all, split_code),
            "split": split.model_dump(mode="json"),
            "duplicates": duplicates,
            "fields": {k: v.__dict__ for k, v in stats.items()},
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - t0, 2),
        }
        del keys, ts_all, iid_all, user_key
        shutil.rmtree(tmp / "keys")  # pass 1's files: copied into the columns
        _publish(tmp, arrays, manifest, out_dir)
    bar.update(1)
    bar.close()
    return PreparedDataset(out_dir)


def _fit(source: RawSource, schema: Schema, source_split: np.ndarray, split_code: np.ndarray) -> dict[str, FieldStats]:
    """Pass 2: vocabularies and normalizations of every feature and non-binary response, on training rows."""
    acc = _FitAccumulator()
    stride = max(1, int(np.ceil((split_code == 0).sum() / _MAX_BUCKET_SAMPLE)))
    feat_cols = [f.name for f in schema.features]
    # numeric and categorical responses are fitted like features (binary ones are kept as 0/1)
    fitted: list[FeatureField | ResponseSpec] = [*schema.features, *(r for r in schema.responses if r.type != "binary")]
    offset = 0
    for chunk in source.iter_chunks(feat_cols + [r.name for r in schema.responses]):
        h = chunk.frame.height
        train = source_split[offset : offset + h] == 0
        offset += h
        if not train.any():
            continue
        for f in fitted:
            if f.type == FieldType.numeric:
                x = _check_finite(chunk, f, as_float(chunk, f.name, allow_null=True))[train]
                x = _transform_numeric(x, f)
                if f.normalize == "bucketize":
                    acc.samples.setdefault(f.name, []).append(x[::stride])
                s = acc.sums.setdefault(f.name, [0.0, 0.0, 0.0])
                s[0] += len(x)
                s[1] += float(x.sum())
                s[2] += float((x * x).sum())
                continue
            if f.type == FieldType.categorical:
                vals = as_str(chunk, f.name).filter(pl.Series(train)).drop_nulls()
            else:
                assert isinstance(f, FeatureField)  # responses are never multi-valued
                vals = _list_cells(chunk, f).filter(pl.Series(train)).list.head(f.max_len).explode().drop_nulls()
            vc = vals.value_counts()
            seen = dict(zip(vc[:, 0].to_list(), vc[:, 1].to_list(), strict=True))
            acc.counts.setdefault(f.name, Counter()).update(seen)
    stats: dict[str, FieldStats] = {}
    for f in fitted:
        if f.type == FieldType.numeric:
            cnt, s1, s2 = acc.sums.get(f.name, [0.0, 0.0, 0.0])
            mean = s1 / cnt if cnt else 0.0
            std = math.sqrt(max(s2 / cnt - mean * mean, 0.0)) if cnt else 1.0
            st = FieldStats(mean=mean, std=std if std > 1e-12 else 1.0)
            if f.normalize == "bucketize":
                sample = np.concatenate(acc.samples.get(f.name, [np.zeros(1)]))
                edges = np.unique(np.quantile(sample, np.linspace(0, 1, f.buckets + 1)[1:-1]))
                st.edges = [float(e) for e in edges]
            stats[f.name] = st
        else:
            counts = acc.counts.get(f.name, Counter())
            kept = [(v, c) for v, c in counts.items() if c >= f.min_count]
            kept.sort(key=lambda vc: (-vc[1], vc[0]))
            stats[f.name] = FieldStats(vocab=[v for v, _ in kept])
    return stats


def response_and_feature_columns(schema: Schema) -> list[str]:
    """The raw columns the encode pass reads: labels, responses (and their known-at times), features."""
    known_cols = [r.known_at for r in schema.responses if r.known_at]
    response_cols = [r.name for r in schema.responses] + known_cols + ([schema.timestamp] if known_cols else [])
    return [l.name for l in schema.labels] + response_cols + [f.name for f in schema.features]


def _encode_rows(
    source: RawSource,
    schema: Schema,
    stats: dict[str, FieldStats],
    source_split: np.ndarray,
    arrays: dict[str, np.memmap],
    start: int,
) -> None:
    """Pass 3: encode every kept source row (``source_split >= 0``) into ``arrays`` from row ``start`` on."""
    lookup = vocab_lookups(stats)
    written = start
    offset = 0
    for chunk in source.iter_chunks(response_and_feature_columns(schema)):
        h = chunk.frame.height
        in_log = source_split[offset : offset + h] >= 0
        offset += h
        sl = slice(written, written + int(in_log.sum()))
        written = sl.stop
        for name, values in encode_chunk(chunk, schema, stats, lookup).items():
            arrays[name][sl] = values[in_log]  # every row is checked; dropped duplicates are not written


@contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """A fresh staging folder beside ``out_dir`` (with ``columns/``), removed if the block fails; the block
    publishes it with :func:`_publish`."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "columns").mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _row_summary(ts: np.ndarray, split_code: np.ndarray) -> dict:
    """The manifest's time ranges and rows per split."""
    lo: int | None = None
    hi: int | None = None
    tr_lo: int | None = None
    tr_hi: int | None = None
    step = 1 << 22  # chunks: no copy of the columns (they may be memory-mapped files)
    for i in range(0, len(ts), step):
        t, train = np.asarray(ts[i : i + step]), np.asarray(split_code[i : i + step]) == 0
        lo = int(t.min()) if lo is None else min(lo, int(t.min()))
        hi = int(t.max()) if hi is None else max(hi, int(t.max()))
        if train.any():
            tt = t[train]
            tr_lo = int(tt.min()) if tr_lo is None else min(tr_lo, int(tt.min()))
            tr_hi = int(tt.max()) if tr_hi is None else max(tr_hi, int(tt.max()))
    return {
        "time_range": [lo, hi],
        "train_time_range": [tr_lo, tr_hi] if tr_lo is not None else None,
        "split_rows": {name: int((split_code == i).sum()) for i, name in enumerate(SPLIT_NAMES)},
    }


def _publish(tmp: Path, arrays: dict[str, np.memmap], manifest: dict, out_dir: Path) -> None:
    """Flush the columns, checksum them into the manifest and move ``tmp`` into place as one rename (a crash
    before it leaves the old dataset as it was)."""
    for a in arrays.values():
        a.flush()
    arrays.clear()
    manifest["columns"] = {p.stem: _sha256(p) for p in sorted((tmp / "columns").glob("*.npy"))}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def split_cut_times(ds: PreparedDataset) -> SplitSpec:
    """The dataset's split as explicit cut times ``[valid_start, test_start]``: its own if it was cut by time,
    else the first timestamp of its valid and test rows (rows later than all of them are test rows)."""
    spec = SplitSpec.model_validate(ds.manifest["split"])
    if spec.cut_ts is not None:
        return spec
    ts, code = np.asarray(ds.col("_ts")), np.asarray(ds.col("_split"))
    after_all = int(ts.max()) + 1
    test_start = int(ts[code == 2].min()) if (code == 2).any() else after_all
    valid_start = int(ts[code == 1].min()) if (code == 1).any() else test_start
    return SplitSpec(cut_ts=(valid_start, test_start))


def _frozen_key(key: str, frozen: PreparedDataset) -> str:
    return hashlib.sha256(f"{key}+frozen:{frozen.fingerprint}".encode()).hexdigest()[:20]


def append(dataset: str | Path, source: RawSource, progress: bool = True) -> PreparedDataset:
    """Add the rows of ``source`` to the prepared dataset ``dataset``: see :func:`_append`. One append at a time
    per dataset (an flock beside it), each building on the version the previous one published."""
    from sampletok.atomic import locked

    root = Path(dataset)
    with locked(root.parent / f".{root.name}.lock"):
        return _append(root, source, progress)


def _append(dataset: Path, source: RawSource, progress: bool) -> PreparedDataset:
    """Add the rows of ``source`` (the dataset's schema) to a prepared dataset, with its fitted vocabularies
    (new values → OOV) and normalizations and its split's cut times; the new rows come after the old ones, so
    the history index, rebuilt on load, grows and row ids already exported keep their meaning. Equal to
    :func:`prepare` of old + new rows with ``frozen`` set to the old dataset (tested; for ``duplicates: error``
    or ``keep_first``, and for a split by cut times: rows tied at a fractional split's boundary may move). An
    instance already in the dataset is an error under ``duplicates: error``; otherwise the new copy is skipped
    and the old one kept (also under ``drop``, which from scratch would drop both). Atomic: a crash leaves the
    old dataset readable."""
    from tqdm.auto import tqdm

    t0 = time.time()
    ds = PreparedDataset(dataset)
    schema, out_dir = ds.schema, ds.root
    if ds.manifest.get("prep_version") != PREP_VERSION:
        raise DataError(str(out_dir), "prepared by another version of sampletok: prepare it again before appending")
    _check_columns(source, schema)
    bar = tqdm(desc=f"append to {schema.name}", unit="pass", total=2, disable=None if progress else True)
    with _staged(out_dir) as tmp:
        keys = _read_keys(source, schema, tmp / "keys")
        origins = keys.origins
        keep, duplicates = _apply_duplicates_policy(keys.instance_id, origins, schema)
        keep = np.ones(len(keys.instance_id), bool) if keep is None else keep
        old_iid = np.asarray(ds.col("_instance_id"))
        known = np.isin(keys.instance_id, old_iid) & keep  # rows dropped as duplicates within the new rows: not counted
        if known.any():
            if schema.duplicates == "error":
                origin, row = _locate(int(np.flatnonzero(known)[0]), origins)
                raise DataError(
                    origin,
                    "instance already in the prepared dataset (set duplicates: keep_first to skip such rows)",
                    schema.instance_id or "(derived instance id)",
                    row,
                )
            keep &= ~known
        ts_new, iid_new, user_key = keys.kept(keep)
        n_old, n_new = ds.n_rows, int(keep.sum())
        split = split_cut_times(ds)
        split_new = assign_splits(ts_new, split)
        source_split = np.full(len(keep), -1, np.int8)
        source_split[keep] = split_new
        bar.update(1)
        arrays = _open_outputs(tmp / "columns", schema, n_old + n_new)
        for name, out in arrays.items():
            out[:n_old] = ds.col(name)
        new = slice(n_old, n_old + n_new)
        arrays["_user_key"][new] = user_key
        arrays["_ts"][new] = ts_new
        arrays["_instance_id"][new] = iid_new
        arrays["_split"][new] = split_new
        del keys, ts_new, iid_new, user_key
        shutil.rmtree(tmp / "keys")
        _encode_rows(source, schema, ds.stats, source_split, arrays, n_old)
        m = dict(ds.manifest)
        m.update(
            key=hashlib.sha256(f"{ds.fingerprint}+{source.fingerprint()}".encode()).hexdigest()[:20],
            n_rows=n_old + n_new,
            n_users=int(len(np.unique(np.asarray(arrays["_user_key"])))),
            **_row_summary(np.asarray(arrays["_ts"]), np.asarray(arrays["_split"])),
            split=split.model_dump(mode="json"),
            appended=[
                *ds.manifest.get("appended", []),
                {
                    "source": source.name,
                    "first_row": n_old,
                    "rows": n_new,
                    "skipped_known_instances": int(known.sum()),
                    "duplicates": duplicates,
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "seconds": round(time.time() - t0, 2),
                },
            ],
        )
        _publish(tmp, arrays, m, out_dir)
    bar.update(1)
    bar.close()
    return PreparedDataset(out_dir)


def _read_keys(source: RawSource, schema: Schema, folder: Path) -> _Keys:
    """Pass 1: every row's timestamp, instance id (hashed) and user key, streamed to files in ``folder`` chunk
    by chunk and memory-mapped (private memory stays bounded by the chunk at any number of rows), the event
    count of each raw user id, and the (file, first row, rows) of each chunk (to name a row in an error)."""
    folder.mkdir(parents=True, exist_ok=True)
    key_cols = [schema.user, schema.timestamp] + ([schema.instance_id] if schema.instance_id else [])
    if not schema.instance_id and schema.item:
        key_cols.append(schema.item)
    origins: list[tuple[str, int, int]] = []
    counts: list[pl.DataFrame] = []  # per-chunk user counts, merged whenever they hold more rows than users
    pending = 0
    names = ("ts", "instance_id", "user_key")
    files = {name: open(folder / f"{name}.bin", "wb") for name in names}  # noqa: SIM115 (closed below)
    try:
        for chunk in source.iter_chunks(key_cols):
            if chunk.frame.height == 0:
                continue
            u = as_str(chunk, schema.user)
            if u.null_count():
                raise DataError(chunk.origin, "null user key", schema.user, _where(chunk, u.is_null().to_numpy()))
            ts = parse_timestamp(chunk, schema.timestamp, schema.timestamp_unit)
            if schema.instance_id:
                iid_s = as_str(chunk, schema.instance_id)
                if iid_s.null_count():
                    raise DataError(
                        chunk.origin, "null instance id", schema.instance_id, _where(chunk, iid_s.is_null().to_numpy())
                    )
            else:
                parts = [u, pl.Series(ts).cast(pl.Utf8)]
                if schema.item:
                    parts.insert(1, as_str(chunk, schema.item).fill_null(""))
                iid_s = (
                    pl.DataFrame({f"k{i}": p for i, p in enumerate(parts)})
                    .select(pl.concat_str(pl.all(), separator="\x1f"))
                    .to_series()
                )
            iid = iid_s.hash(seed=20260422).reinterpret(signed=True).to_numpy()
            for name, values in zip(names, (ts, iid, user_keys(u, chunk.origin)), strict=True):
                np.ascontiguousarray(values, dtype=np.int64).tofile(files[name])
            vc = u.rename("user").value_counts(name="events")
            counts.append(vc)
            pending += vc.height
            if pending > 4 * counts[0].height + 1_000_000:  # keep the per-user counts ∝ users, not rows
                counts = [_merged_counts(counts)]
                pending = counts[0].height
            origins.append((chunk.origin, chunk.first_row, chunk.frame.height))
    finally:
        for f in files.values():
            f.close()
    if not origins:
        raise DataError(source.name, "no rows")
    user_counts = _merged_counts(counts)
    # two raw ids of one key anywhere in the log (not only within a chunk) are an error, never a silent merge
    user_keys(user_counts.get_column("user"), source.name)
    cols = {name: np.memmap(folder / f"{name}.bin", dtype=np.int64, mode="r") for name in names}
    return _Keys(cols["ts"], cols["instance_id"], cols["user_key"], user_counts, origins)


@dataclass
class _Keys:
    """What pass 1 reads: [N] int64 columns (memory-mapped files), events per raw user id, chunk origins."""

    ts: np.ndarray
    instance_id: np.ndarray
    user_key: np.ndarray
    user_counts: pl.DataFrame  # columns user (raw id), events
    origins: list[tuple[str, int, int]]

    def kept(self, keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ts, instance ids, user keys) of the kept rows (all of them, still memory-mapped, for ``None``)."""
        if keep is None:
            return self.ts, self.instance_id, self.user_key
        return self.ts[keep], self.instance_id[keep], self.user_key[keep]

    def example_users(self) -> list[str]:
        """A few raw ids of the users with the most events (only their keys are kept otherwise): ``serve``'s
        example."""
        top = self.user_counts.sort(["events", "user"], descending=[True, False]).head(3)
        return top.get_column("user").cast(pl.Utf8).to_list()


def _merged_counts(counts: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(counts).group_by("user").agg(pl.col("events").sum())


def _apply_duplicates_policy(
    iid: np.ndarray, origins: list[tuple[str, int, int]], schema: Schema
) -> tuple[np.ndarray | None, dict]:
    """(rows to keep, or None for all; the manifest's report) under ``schema.duplicates``.

    Rows sharing an instance id (derived: user, item, timestamp) are an error naming both rows, or all dropped
    (``drop``), or all but the first in source order dropped (``keep_first``)."""
    report = {"policy": schema.duplicates, "repeated_ids": 0, "rows_removed": 0}
    # the common case first, in half the memory of the argsort below: a sorted copy with no repeated value
    ordered = np.sort(iid)
    repeated = bool((ordered[1:] == ordered[:-1]).any())
    del ordered
    if not repeated:
        return None, report
    order = np.argsort(iid, kind="stable")
    same = iid[order][1:] == iid[order][:-1]
    if schema.duplicates == "error":
        _raise_duplicate(iid, order, np.flatnonzero(same), origins, schema.instance_id or "(derived instance id)")
    in_group = np.r_[same, False] | np.r_[False, same]  # sorted positions whose id repeats
    later = np.r_[False, same]  # sorted positions after the first of their id (stable: first in file order)
    keep = np.ones(len(iid), bool)
    keep[order[in_group if schema.duplicates == "drop" else later]] = False
    report["repeated_ids"] = int((np.r_[True, ~same] & in_group).sum())
    report["rows_removed"] = int((~keep).sum())
    return keep, report


def _locate(i: int, origins: list[tuple[str, int, int]]) -> tuple[str, int]:
    """(file, row) of the i-th row read, from the (file, first row, rows) of each chunk."""
    start = 0
    for origin, first_row, h in origins:
        if i < start + h:
            return origin, first_row + i - start
        start += h
    raise AssertionError(i)


def _raise_duplicate(
    iid: np.ndarray, order: np.ndarray, dup: np.ndarray, origins: list[tuple[str, int, int]], column: str
) -> None:
    first, second = int(order[dup[0]]), int(order[dup[0] + 1])
    o2, r2 = _locate(second, origins)
    _, r1 = _locate(first, origins)
    raise DataError(
        o2,
        f"duplicate instance id (same as row {r1}); {len(dup)} duplicates in all "
        "(set duplicates: drop or keep_first in the schema to remove them)",
        column,
        r2,
    )


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
) -> dict[str, np.ndarray]:
    """Every column of a chunk of raw rows as prepared codes (``label__``, ``resp__``, ``known__``, ``cat__``,
    ``num__``, ``multi__``), with the fitted vocabularies and statistics: the one encoding function of both
    ``prepare`` and :class:`~sampletok.data.encoder.Encoder`. ``outcomes=False`` encodes features only (a
    request has no labels yet). Bad cells raise a one-line DataError naming the chunk's origin, column, row."""
    out: dict[str, np.ndarray] = {}
    if outcomes:
        for lab in schema.task_labels:
            y = as_float(chunk, lab)
            bad = ~np.isfinite(y)
            if bad.any():
                raise DataError(chunk.origin, "label is not a finite number", lab, _where(chunk, bad))
            out[f"label__{lab}"] = y
        if any(r.known_at for r in schema.responses):
            row_ts = parse_timestamp(chunk, schema.timestamp, schema.timestamp_unit)
        for r in schema.responses:
            out[f"resp__{r.name}"] = _encode_response(chunk, r, stats.get(r.name), lookup.get(r.name))
            if r.known_at:
                known = parse_timestamp(chunk, r.known_at, schema.timestamp_unit, null_is_never=True)
                early = known < row_ts
                if early.any():
                    msg = f"response '{r.name}' is known before its event (known_at < {schema.timestamp})"
                    raise DataError(chunk.origin, msg, r.known_at, _where(chunk, early))
                out[f"known__{r.name}"] = known
    for f in schema.features:
        st = stats[f.name]
        if f.type == FieldType.numeric:
            x = _transform_numeric(_check_finite(chunk, f, as_float(chunk, f.name, allow_null=True)), f)
            if f.normalize == "bucketize":
                out[f"cat__{f.name}"] = np.searchsorted(np.asarray(st.edges), x, side="right") + 1
            elif f.normalize == "none":
                out[f"num__{f.name}"] = x
            else:
                out[f"num__{f.name}"] = (x - st.mean) / st.std
        elif f.type == FieldType.categorical:
            out[f"cat__{f.name}"] = _encode(as_str(chunk, f.name), lookup[f.name], st.vocab_size - 1)
        else:
            out[f"multi__{f.name}"] = _encode_lists(_list_cells(chunk, f), lookup[f.name], st.vocab_size - 1, f.max_len)
    return out


def _encode_response(chunk: RawChunk, r: ResponseSpec, st: FieldStats | None, vocab: VocabLookup | None) -> np.ndarray:
    """A response column as float32: 0/1 (binary), the normalized value (numeric) or the vocabulary code
    (categorical, bucketized numeric)."""
    if r.type == "categorical":
        assert st is not None and vocab is not None
        values = as_str(chunk, r.name)
        if values.null_count():
            raise DataError(chunk.origin, "missing value", r.name, _where(chunk, values.is_null().to_numpy()))
        return _encode(values, vocab, st.vocab_size - 1).astype(np.float32)
    x = as_float(chunk, r.name)
    bad = ~np.isfinite(x) if r.type == "numeric" else ~np.isin(x, (0.0, 1.0))
    if bad.any():
        what = "not a finite number" if r.type == "numeric" else f"binary response is {float(x[bad][0])}, not 0 or 1"
        raise DataError(chunk.origin, what, r.name, _where(chunk, bad))
    if r.type == "binary":
        return x.astype(np.float32)
    assert st is not None
    x = _transform_numeric(x, r)
    if r.normalize == "bucketize":
        return (np.searchsorted(np.asarray(st.edges), x, side="right") + 1).astype(np.float32)
    return (x if r.normalize == "none" else (x - st.mean) / st.std).astype(np.float32)


def _open_outputs(folder: Path, schema: Schema, n: int) -> dict[str, np.memmap]:
    def mm(name: str, dtype, shape) -> np.memmap:
        return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

    out = {
        "_user_key": mm("_user_key", np.int64, (n,)),
        "_ts": mm("_ts", np.int64, (n,)),
        "_instance_id": mm("_instance_id", np.int64, (n,)),
        "_split": mm("_split", np.int8, (n,)),
    }
    for lab in schema.labels:
        out[f"label__{lab.name}"] = mm(f"label__{lab.name}", np.float32, (n,))
    for r in schema.responses:
        out[f"resp__{r.name}"] = mm(f"resp__{r.name}", np.float32, (n,))  # value, or vocabulary code
        if r.known_at:
            out[f"known__{r.name}"] = mm(f"known__{r.name}", np.int64, (n,))
    for f in schema.features:
        if f.type == FieldType.multi_categorical:
            out[f"multi__{f.name}"] = mm(f"multi__{f.name}", np.int32, (n, f.max_len))
        elif f.is_categorical_like:
            out[f"cat__{f.name}"] = mm(f"cat__{f.name}", np.int32, (n,))
        else:
            out[f"num__{f.name}"] = mm(f"num__{f.name}", np.float32, (n,))
    return out


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
