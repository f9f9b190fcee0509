"""Readers that stream a raw-sample log in bounded-memory chunks.

Every reader yields :class:`RawChunk` objects that remember where their rows came from, so an error can name
the file and the row. The per-chunk code in :mod:`sampletok.data.prepare` is all a distributed engine would
need to run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from sampletok.errors import DataError

DEFAULT_CHUNK_ROWS = 1 << 18


@dataclass(frozen=True)
class RawChunk:
    origin: str  # file path or frame name
    first_row: int  # 1-based data row (header excluded) of the chunk's first row within its origin
    frame: pl.DataFrame


class RawSource(Protocol):
    """Anything that streams a raw-sample log in chunks."""

    name: str

    @property
    def columns(self) -> list[str]: ...

    def iter_chunks(self, columns: Sequence[str] | None = None) -> Iterator[RawChunk]: ...

    def fingerprint(self) -> str: ...


class FrameSource:
    """An in-memory polars frame (used by the dataset readers and tests)."""

    def __init__(self, frame: pl.DataFrame, name: str = "<frame>", chunk_rows: int = DEFAULT_CHUNK_ROWS):
        self.frame, self.name, self.chunk_rows = frame, name, chunk_rows

    @property
    def columns(self) -> list[str]:
        return list(self.frame.columns)

    def iter_chunks(self, columns: Sequence[str] | None = None) -> Iterator[RawChunk]:
        df = self.frame if columns is None else self.frame.select(columns)
        for start in range(0, max(df.height, 1), self.chunk_rows):
            yield RawChunk(self.name, start + 1, df.slice(start, self.chunk_rows))

    def fingerprint(self) -> str:
        h = self.frame.hash_rows(seed=0).cast(pl.Float64)
        return f"frame:{self.frame.height}:{self.frame.columns}:{int(h.sum())}:{int((h * 31).sum())}"


DATA_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".tab")


class FileSource:
    """CSV/TSV or Parquet files at any path, read in chunks. CSV cells arrive as strings and are typed by
    the schema during preparation, so a bad cell is reported with its row instead of failing inference."""

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        delimiter: str | None = None,
    ):
        if isinstance(paths, (str, Path)):
            paths = [paths]
        # a folder stands for its data files (a folder of Parquet partitions), in name order
        self.paths = [
            f
            for p in map(Path, paths)
            for f in (sorted(x for x in p.iterdir() if x.suffix.lower() in DATA_SUFFIXES) if p.is_dir() else [p])
        ]
        if not self.paths:
            raise DataError("<source>", "no input files given")
        seen: set[Path] = set()
        for p in self.paths:  # a file twice (or a folder and a file in it) would be read twice
            if p.resolve() in seen:
                raise DataError(str(p), "given twice")
            seen.add(p.resolve())
        for p in self.paths:
            if not p.exists():
                raise DataError(str(p), "file not found")
        self.chunk_rows, self.delimiter = chunk_rows, delimiter
        self.name = ",".join(str(p) for p in self.paths)
        cols = [self._columns_of(p) for p in self.paths]
        for p, c in zip(self.paths[1:], cols[1:], strict=True):
            if c != cols[0]:
                raise DataError(str(p), f"columns {c} differ from {self.paths[0]}'s {cols[0]}")
        self._columns = cols[0]

    def _is_parquet(self, p: Path) -> bool:
        return p.suffix.lower() in (".parquet", ".pq")

    def _delim(self, p: Path) -> str:
        if self.delimiter:
            return self.delimiter
        return "\t" if p.suffix.lower() in (".tsv", ".tab") else ","

    def _columns_of(self, p: Path) -> list[str]:
        try:
            if self._is_parquet(p):
                return list(pq.ParquetFile(p).schema_arrow.names)
            with open(p, encoding="utf-8", errors="replace") as fh:
                header = fh.readline().rstrip("\r\n")
            return header.split(self._delim(p))
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(str(p), f"cannot read: {e}") from None

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def iter_chunks(self, columns: Sequence[str] | None = None) -> Iterator[RawChunk]:
        for p in self.paths:
            row = 1
            try:
                if self._is_parquet(p):
                    for batch in pq.ParquetFile(p).iter_batches(batch_size=self.chunk_rows, columns=columns):
                        df = cast(pl.DataFrame, pl.from_arrow(batch))  # a RecordBatch converts to a DataFrame
                        yield RawChunk(str(p), row, df)
                        row += df.height
                else:
                    names = self._columns
                    reader = pacsv.open_csv(
                        p,
                        read_options=pacsv.ReadOptions(block_size=1 << 24),
                        parse_options=pacsv.ParseOptions(delimiter=self._delim(p)),
                        convert_options=pacsv.ConvertOptions(
                            column_types={c: pa.string() for c in names},
                            include_columns=list(columns) if columns is not None else None,
                            strings_can_be_null=True,
                        ),
                    )
                    for batch in reader:
                        df = cast(pl.DataFrame, pl.from_arrow(batch))
                        for start in range(0, df.height, self.chunk_rows):
                            part = df.slice(start, self.chunk_rows)
                            yield RawChunk(str(p), row, part)
                            row += part.height
            except pa.ArrowInvalid as e:
                raise DataError(str(p), f"malformed file near row {row}: {e}") from None

    def fingerprint(self) -> str:
        parts = []
        for p in self.paths:
            st = p.stat()
            parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        return "files:" + "|".join(parts)
