"""Typed reading of raw cells: timestamps, numbers, strings, lists and user keys, each bad cell a one-line
:class:`~sampletok.errors.DataError` naming the file, the column and the row."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl

from sampletok.columns import NEVER
from sampletok.data.sources.files import RawChunk
from sampletok.errors import DataError
from sampletok.schema import FeatureField


def row_of(chunk: RawChunk, mask: np.ndarray) -> int:
    """1-based row (within the chunk's origin) of the first True in mask."""
    return chunk.first_row + int(np.flatnonzero(mask)[0])


def parse_timestamp(chunk: RawChunk, column: str, unit: str, *, null_is_never: bool = False) -> np.ndarray:
    """Column as int64 ticks of ``unit``; a null is an error, or :data:`NEVER` when ``null_is_never``."""
    s = chunk.frame.get_column(column)
    if s.null_count():
        null = s.is_null().to_numpy()
        if not null_is_never:
            raise DataError(chunk.origin, "null timestamp", column, row_of(chunk, null))
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
            raise DataError(chunk.origin, msg, column, row_of(chunk, bad))
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
        raise DataError(chunk.origin, "missing value", column, row_of(chunk, s.is_null().to_numpy()))
    return s.cast(pl.Float64).fill_null(float("nan")).to_numpy()


def as_str(chunk: RawChunk, column: str) -> pl.Series:
    s = chunk.frame.get_column(column)
    if s.dtype.is_float():
        # 3.0 → "3" so CSV strings and parquet floats of integer ids agree
        f = s.to_numpy()
        if np.all(np.isnan(f) | (f == np.floor(f))):
            s = s.cast(pl.Int64, strict=False)
    return s.cast(pl.Utf8)


def list_cells(chunk: RawChunk, f: FeatureField) -> pl.Series:
    s = chunk.frame.get_column(f.name)
    s = s.cast(pl.List(pl.Utf8)) if isinstance(s.dtype, pl.List) else s.cast(pl.Utf8).str.split(f.separator)
    return s.list.eval(pl.element().filter(pl.element().str.len_chars() > 0))  # "" is no value


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
