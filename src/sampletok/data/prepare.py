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
from typing import Literal

import numpy as np
import polars as pl

from sampletok.columns import (
    INSTANCE_ID,
    SPLIT,
    SPLIT_NAMES,
    TIMESTAMP,
    USER_KEY,
    cat_col,
    known_col,
    label_col,
    multi_col,
    num_col,
    resp_col,
)
from sampletok.data.cells import as_float, as_str, list_cells, parse_timestamp, row_of, user_keys
from sampletok.data.codec import (
    FieldStats,
    check_finite,
    encode_chunk,
    response_and_feature_columns,
    transform_numeric,
    vocab_lookups,
)
from sampletok.data.dataset import PreparedDataset, SplitSpec, assign_splits, split_cut_times
from sampletok.data.sources.files import RawSource
from sampletok.errors import ConfigError, DataError
from sampletok.schema import FeatureField, FieldType, ResponseSpec, Schema

PREP_VERSION = 2  # 2: _user_key is the stable hash of the raw user id
_MAX_BUCKET_SAMPLE = 1_000_000


@dataclass
@dataclass
class _FitAccumulator:
    counts: dict[str, Counter] = field(default_factory=dict)
    sums: dict[str, list[float]] = field(default_factory=dict)  # n, sum, sumsq
    samples: dict[str, list[np.ndarray]] = field(default_factory=dict)


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
        arrays[USER_KEY][:] = user_key
        arrays[TIMESTAMP][:] = ts_all
        arrays[INSTANCE_ID][:] = iid_all
        arrays[SPLIT][:] = split_code
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
                x = check_finite(chunk, f, as_float(chunk, f.name, allow_null=True))[train]
                x = transform_numeric(x, f)
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
                vals = list_cells(chunk, f).filter(pl.Series(train)).list.head(f.max_len).explode().drop_nulls()
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
        old_iid = np.asarray(ds.col(INSTANCE_ID))
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
        arrays[USER_KEY][new] = user_key
        arrays[TIMESTAMP][new] = ts_new
        arrays[INSTANCE_ID][new] = iid_new
        arrays[SPLIT][new] = split_new
        del keys, ts_new, iid_new, user_key
        shutil.rmtree(tmp / "keys")
        _encode_rows(source, schema, ds.stats, source_split, arrays, n_old)
        m = dict(ds.manifest)
        m.update(
            key=hashlib.sha256(f"{ds.fingerprint}+{source.fingerprint()}".encode()).hexdigest()[:20],
            n_rows=n_old + n_new,
            n_users=int(len(np.unique(np.asarray(arrays[USER_KEY])))),
            **_row_summary(np.asarray(arrays[TIMESTAMP]), np.asarray(arrays[SPLIT])),
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
                raise DataError(chunk.origin, "null user key", schema.user, row_of(chunk, u.is_null().to_numpy()))
            ts = parse_timestamp(chunk, schema.timestamp, schema.timestamp_unit)
            if schema.instance_id:
                iid_s = as_str(chunk, schema.instance_id)
                if iid_s.null_count():
                    raise DataError(
                        chunk.origin, "null instance id", schema.instance_id, row_of(chunk, iid_s.is_null().to_numpy())
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


def _open_outputs(folder: Path, schema: Schema, n: int) -> dict[str, np.memmap]:
    def mm(name: str, dtype, shape) -> np.memmap:
        return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

    out = {
        USER_KEY: mm(USER_KEY, np.int64, (n,)),
        TIMESTAMP: mm(TIMESTAMP, np.int64, (n,)),
        INSTANCE_ID: mm(INSTANCE_ID, np.int64, (n,)),
        SPLIT: mm(SPLIT, np.int8, (n,)),
    }
    for lab in schema.labels:
        out[label_col(lab.name)] = mm(label_col(lab.name), np.float32, (n,))
    for r in schema.responses:
        out[resp_col(r.name)] = mm(resp_col(r.name), np.float32, (n,))  # value, or vocabulary code
        if r.known_at:
            out[known_col(r.name)] = mm(known_col(r.name), np.int64, (n,))
    for f in schema.features:
        if f.type == FieldType.multi_categorical:
            out[multi_col(f.name)] = mm(multi_col(f.name), np.int32, (n, f.max_len))
        elif f.is_categorical_like:
            out[cat_col(f.name)] = mm(cat_col(f.name), np.int32, (n,))
        else:
            out[num_col(f.name)] = mm(num_col(f.name), np.float32, (n,))
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
