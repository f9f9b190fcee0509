"""The reader of a prepared dataset (:class:`PreparedDataset`, memory-mapped columns and the manifest) and the
time-ordered split it was cut by."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sampletok.columns import (
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
from sampletok.data.codec import FieldStats, response_vocab_size
from sampletok.errors import DataError
from sampletok.schema import FeatureField, FieldType, Schema


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
            mask &= np.isin(np.asarray(self.col(cat_col(name))), codes)
        return mask

    def rows(self, split: str, seen_users_only: bool = False, where: dict[str, list] | None = None) -> np.ndarray:
        """Row ids of a split, in time order (stable); ``where`` keeps rows whose fields take given values."""
        code = SPLIT_NAMES.index(split)
        rows = np.flatnonzero((np.asarray(self.col(SPLIT)) == code) & self.where(where))
        if seen_users_only and split != "train":
            train_users = np.unique(np.asarray(self.col(USER_KEY))[self.rows("train", where=where)])
            rows = rows[np.isin(np.asarray(self.col(USER_KEY))[rows], train_users)]
        ts = np.asarray(self.col(TIMESTAMP))[rows]
        return rows[np.argsort(ts, kind="stable")]

    def vocab_size(self, field_name: str) -> int:
        return self.stats[field_name].vocab_size

    # ------------------------------------------------------------------ responses of past rows
    def response_column(self, name: str) -> np.ndarray:
        """[N] float32 values of one response (task labels included), as models read it on a past row."""
        return self.col(label_col(name) if name in self.schema.task_labels else resp_col(name))

    def response_vocab_size(self, name: str) -> int:
        """Embedding-table size of a categorical (or bucketized) response; 0 for one read as a value."""
        return response_vocab_size(self.schema, self.stats, name)

    def response_known_at(self) -> dict[int, np.ndarray]:
        """{response index: [N] int64 time it became known} for responses with a ``known_at`` column."""
        names = self.schema.response_names
        return {names.index(r.name): self.col(known_col(r.name)) for r in self.schema.responses if r.known_at}

    def response_available_at(self, rows: np.ndarray | None = None) -> np.ndarray:
        """[N or len(rows), R] int64 time from which each response of each row is visible (strictly after)."""
        rows = np.arange(self.n_rows) if rows is None else np.asarray(rows)
        avail = np.asarray(self.col(TIMESTAMP))[rows, None] + np.array(self.schema.response_delays(), np.int64)[None]
        for k, known in self.response_known_at().items():
            avail[:, k] = np.asarray(known)[rows]
        return avail

    def feature_column(self, f: FeatureField) -> str:
        if f.type == FieldType.multi_categorical:
            return multi_col(f.name)
        return cat_col(f.name) if f.is_categorical_like else num_col(f.name)


def split_cut_times(ds: PreparedDataset) -> SplitSpec:
    """The dataset's split as explicit cut times ``[valid_start, test_start]``: its own if it was cut by time,
    else the first timestamp of its valid and test rows (rows later than all of them are test rows)."""
    spec = SplitSpec.model_validate(ds.manifest["split"])
    if spec.cut_ts is not None:
        return spec
    ts, code = np.asarray(ds.col(TIMESTAMP)), np.asarray(ds.col(SPLIT))
    after_all = int(ts.max()) + 1
    test_start = int(ts[code == 2].min()) if (code == 2).any() else after_all
    valid_start = int(ts[code == 1].min()) if (code == 1).any() else test_start
    return SplitSpec(cut_ts=(valid_start, test_start))
