"""The one batch structure every model reads, and the vectorized loader that builds it.

A :class:`Batch` holds the request's own features, its labels, and its history (the last ``n`` rows of the
same user strictly before the request time, from :class:`~sampletok.history.HistoryIndex`). Models
declare nothing special: they read the parts they need. Building a batch is a handful of NumPy gathers,
no per-sample Python.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from sampletok import distributed
from sampletok.atomic import locked
from sampletok.columns import NEVER, TIMESTAMP, USER_KEY, cat_col, label_col, multi_col, num_col
from sampletok.data.dataset import PreparedDataset
from sampletok.features import Batch, FeatureLayout, HistoryTokens
from sampletok.history import HistoryIndex
from sampletok.schema import FieldType
from sampletok.store.base import TokenStore


class BatchLoader:
    """Iterates batches over a set of request rows.

    Args:
        ds: the prepared dataset (every row may be history, whatever its split).
        rows: request row ids (e.g. ``ds.rows("train")``).
        hist_len: history positions per request (0 disables history).
        shuffle/seed: a fresh permutation per epoch from ``seed + epoch`` (resumable).
        oov_rate: when iterating, each categorical value of a request and of its item-ID history is replaced by
            its field's OOV code with this probability (fresh per epoch from ``seed + epoch``), so the OOV
            embedding is trained; ``build`` alone never replaces.
        history_samples: also gather the distinct history rows as whole samples (``Batch.history_samples``),
            for models that read past samples (SIF quantizes them).
        tokens: a token store to fetch each request's tokens from (``Batch.tokens``: IAT embeddings, SIF codes).
    """

    def __init__(
        self,
        ds: PreparedDataset,
        rows: np.ndarray,
        batch_size: int = 1024,
        hist_len: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        index: HistoryIndex | None = None,
        layout: FeatureLayout | None = None,
        oov_rate: float = 0.0,
        history_samples: bool = False,
        tokens: TokenSource | None = None,
    ):
        self.ds, self.rows = ds, np.asarray(rows, dtype=np.int64)
        self.oov_rate, self.history_samples, self.tokens = oov_rate, history_samples, tokens
        self.layout = layout or FeatureLayout.from_dataset(ds)
        self.hist_len = resolved_hist_len(ds, hist_len)
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0
        self.index = index or history_index(ds)
        lay = self.layout
        m = _stacked_columns(ds, lay)  # one copy per dataset and layout, shared by every loader over it
        self._cat, self._num, self._multi = m["cat"], m["num"], m["multi"]
        self._labels, self._responses = m["labels"], m["responses"]
        self._seq_cat, self._seq_multi = m["seq_cat"], m["seq_multi"]
        seq_cat_idx, seq_multi_idx = lay.sequence_positions()
        self._user = np.asarray(ds.col(USER_KEY))
        self._ts = np.asarray(ds.col(TIMESTAMP))
        self._ticks_per_second = float(ds.schema.ticks_per_second)  # hist_gap is seconds on ms logs too
        # OOV code per column (0 = never replaced: bucketized numerics have no unseen values)
        true_cat = [f.type == FieldType.categorical for f in lay.cat_fields]
        self._cat_oov = np.array(
            [lay.vocab_sizes[f.name] - 1 if c else 0 for f, c in zip(lay.cat_fields, true_cat, strict=True)], np.int64
        )
        self._multi_oov = np.array([lay.vocab_sizes[f.name] - 1 for f in lay.multi_fields], np.int64)
        self._seq_cat_oov, self._seq_multi_oov = self._cat_oov[seq_cat_idx], self._multi_oov[seq_multi_idx]
        self._known_at = ds.response_known_at()  # {response index: [N] known-at time}, NEVER: never known

    def __len__(self) -> int:
        n = len(self.rows)
        if distributed.active():
            w = distributed.world_size()
            n = n // w if self.shuffle else (n + w - 1 - distributed.rank()) // w
        return (n + self.batch_size - 1) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        rows = self.rows
        if self.shuffle:
            rows = rows[np.random.default_rng(self.seed * 100_003 + self.epoch).permutation(len(rows))]
        if distributed.active():  # data-parallel: each rank its slice of the (same) permutation
            w, r = distributed.world_size(), distributed.rank()
            # training: equal slices (every rank runs the same number of steps, or DDP would wait forever);
            # evaluation: every row once, the predictions gathered (trainer.predict_logits)
            rows = rows[: len(rows) // w * w][r::w] if self.shuffle else rows[r::w]
        oov_rng = np.random.default_rng(self.seed * 100_019 + self.epoch) if self.oov_rate > 0 else None
        for start in range(0, len(rows), self.batch_size):
            batch = self.build(rows[start : start + self.batch_size])
            yield self._replace_by_oov(batch, oov_rng) if oov_rng is not None else batch

    def _replace_by_oov(self, b: Batch, rng: np.random.Generator) -> Batch:
        """Each present categorical value → its field's OOV code with probability ``oov_rate``."""
        for name, oov, field_axis in (
            ("cat", self._cat_oov, 1),
            ("multi", self._multi_oov, 2),
            ("hist_cat", self._seq_cat_oov, 1),
            ("hist_multi", self._seq_multi_oov, 2),
        ):
            setattr(b, name, torch.from_numpy(self._swap_last_axes(getattr(b, name).numpy(), oov, rng, field_axis)))
        return b

    def _swap_last_axes(
        self, x: np.ndarray, oov: np.ndarray, rng: np.random.Generator, field_axis_from_end: int
    ) -> np.ndarray:
        """``x`` with its fields on axis ``-field_axis_from_end``; padding (0) and OOV-less fields stay."""
        shape = [1] * x.ndim
        shape[x.ndim - field_axis_from_end] = len(oov)
        codes = oov.reshape(shape)
        hit = (rng.random(x.shape) < self.oov_rate) & (x > 0) & (codes > 0)
        return np.where(hit, codes, x)

    def build(self, rows: np.ndarray) -> Batch:
        """The batch for the given request rows (with its history samples and tokens when configured)."""
        rows = np.asarray(rows, dtype=np.int64)
        history = self._history(rows, self.hist_len)
        if self.history_samples:
            # each distinct history row once, as a sample of its own (no nested history)
            present = history.rows[history.mask]
            uniq, inverse = np.unique(present, return_inverse=True)
            index = np.full(history.rows.shape, -1, np.int64)
            index[history.mask] = inverse
            history.samples, history.sample_index = self._requests(uniq), index
            history.samples_history = self._history(uniq, 0)
        requests = self._requests(rows)
        # the request rows' own outcomes: targets of response heads only (history samples never get them)
        requests.responses, requests.response_mask = self._responses[rows], self._own_response_mask(rows)
        tokens = self.tokens.fetch(requests.user, requests.ts) if self.tokens is not None else None
        return build_batch(requests, history, tokens)

    def _own_response_mask(self, rows: np.ndarray) -> np.ndarray:
        """[B, R] True where the row has the outcome (False: a ``known_at`` response that never became known)."""
        mask = np.ones((len(rows), len(self.layout.responses)), bool)
        for k, known in self._known_at.items():
            mask[:, k] = np.asarray(known[rows]) != NEVER
        return mask

    def _requests(self, rows: np.ndarray) -> RequestRows:
        return RequestRows(
            cat=self._cat[rows],
            multi=self._multi[rows],
            num=self._num[rows],
            labels=self._labels[rows],
            user=self._user[rows],
            ts=self._ts[rows],
            rows=rows,
        )

    def _history(self, rows: np.ndarray, hist_len: int) -> FetchedHistory:
        h = self.index.fetch(self._user[rows], self._ts[rows], hist_len)
        padded = np.where(h.mask, h.rows, len(self._seq_cat) - 1)  # empty positions → the padding row
        return FetchedHistory(
            cat=self._seq_cat[padded],
            multi=self._seq_multi[padded],
            mask=h.mask,
            gap=h.gap / np.float32(self._ticks_per_second),
            rows=h.rows,
            responses=(self._responses[np.where(h.mask, h.rows, 0)] * h.response_mask).astype(np.float32),
            response_mask=h.response_mask,
        )


@dataclass
class RequestRows:
    """The request side of a batch, as arrays: B rows' own features, task labels and keys (offline: gathered
    from the dataset's columns; serving: the encoded request, labels zero, rows -1)."""

    cat: np.ndarray  # [B, F_c] integer codes
    multi: np.ndarray  # [B, F_m, L_m]
    num: np.ndarray  # [B, F_n] float32
    labels: np.ndarray  # [B, Y] float32
    user: np.ndarray  # [B] user keys
    ts: np.ndarray  # [B] request times
    rows: np.ndarray  # [B] dataset rows (-1: a served request)
    responses: np.ndarray | None = None  # [B, R] the rows' own outcomes (offline requests only: targets)
    response_mask: np.ndarray | None = None  # [B, R] bool, True where the row has the outcome


@dataclass
class FetchedHistory:
    """Each request's last ``hist_len`` past rows, right-aligned, as arrays (sequence fields only). With
    ``group`` ([B] int64, contiguous, numbered from 0) the leading dimension is one per history group, not per
    request: rows of one group share one history (a served request's candidates).

    ``samples``: each distinct past row once as a sample of its own (every field) with ``sample_index`` [b, n]
    its position there (-1 where padded), and ``samples_history`` the samples' own (empty) history, for models
    that read whole past samples (SIF)."""

    cat: np.ndarray  # [b, n, S_c]
    multi: np.ndarray  # [b, n, S_m, L_m]
    mask: np.ndarray  # [b, n] bool
    gap: np.ndarray  # [b, n] float32 seconds before the request
    rows: np.ndarray  # [b, n] int64 past rows' ids (dataset rows offline, store rows online), -1 where padded
    responses: np.ndarray  # [b, n, R] float32, 0 where not yet known
    response_mask: np.ndarray  # [b, n, R] bool
    group: np.ndarray | None = None
    samples: RequestRows | None = None
    sample_index: np.ndarray | None = None
    samples_history: FetchedHistory | None = None

    @classmethod
    def empty(cls, b: int, layout: FeatureLayout) -> FetchedHistory:
        """No history positions for ``b`` requests (a past sample's own history)."""
        s_c, s_m = (len(p) for p in layout.sequence_positions())
        r = len(layout.responses)
        return cls(
            cat=np.zeros((b, 0, s_c), np.int64),
            multi=np.zeros((b, 0, s_m, layout.multi_len), np.int64),
            mask=np.zeros((b, 0), bool),
            gap=np.zeros((b, 0), np.float32),
            rows=np.zeros((b, 0), np.int64),
            responses=np.zeros((b, 0, r), np.float32),
            response_mask=np.zeros((b, 0, r), bool),
        )


def build_batch(requests: RequestRows, history: FetchedHistory, tokens: HistoryTokens | None = None) -> Batch:
    """The one way a :class:`Batch` is built, offline (:class:`BatchLoader`) and in serving (the Scorer): from
    the request rows, their fetched history and their fetched tokens. A grouped history is spread to the rows
    of each group (a view, without a copy, when there is one group); its tokens too when there is one group,
    else they stay one per group (``Batch.tokens_by_group``)."""
    t = torch.from_numpy
    b = len(requests.rows)
    group = None if history.group is None else t(np.ascontiguousarray(history.group, np.int64))

    def spread(one: torch.Tensor) -> torch.Tensor:
        if group is None:
            return one
        return one.expand(b, *one.shape[1:]) if one.shape[0] == 1 else one[group]

    def hist(x: np.ndarray) -> torch.Tensor:
        return spread(t(np.ascontiguousarray(x)) if group is not None else t(x))

    batch = Batch(
        cat=t(requests.cat.astype(np.int64)),
        multi=t(requests.multi.astype(np.int64)),
        num=t(np.ascontiguousarray(requests.num)),
        labels=t(requests.labels),
        hist_cat=hist(history.cat.astype(np.int64)),
        hist_multi=hist(history.multi.astype(np.int64)),
        hist_mask=hist(history.mask),
        hist_gap=hist(history.gap),
        hist_rows=hist(history.rows),
        hist_responses=hist(history.responses),
        hist_response_mask=hist(history.response_mask),
        user=t(requests.user.astype(np.int64)),
        ts=t(requests.ts.astype(np.int64)),
        rows=t(requests.rows),
        history_group=group,
        responses=None if requests.responses is None else t(np.ascontiguousarray(requests.responses, np.float32)),
        response_mask=None if requests.response_mask is None else t(requests.response_mask),
    )
    if history.samples is not None:
        assert history.samples_history is not None and history.sample_index is not None
        batch.history_samples = build_batch(history.samples, history.samples_history)
        batch.history_sample_index = hist(history.sample_index)
    if tokens is not None:
        if group is not None and tokens.mask.shape[0] == 1:
            tokens = HistoryTokens(**{x.name: spread(getattr(tokens, x.name)) for x in fields(tokens)})  # views
        elif group is not None:  # several histories: kept one per group (Batch.group_tokens), never copied per row
            batch.tokens_by_group = True
        batch.tokens = tokens
    return batch


@dataclass
class TokenSource:
    """A token store a model reads and how many tokens per request: the data stage fetches them into
    ``Batch.tokens`` (models never touch a store)."""

    store: TokenStore
    hist_len: int
    dequantize: bool = True

    @property
    def producer(self) -> str:
        return str(self.store.meta["producer"])

    def fetch(self, users: np.ndarray, ts: np.ndarray) -> HistoryTokens:
        f = self.store.fetch(users, ts, self.hist_len, dequantize=self.dequantize)
        payload = torch.from_numpy(np.ascontiguousarray(f.payload))
        if not payload.is_floating_point():
            payload = payload.long()  # codes of any stored width
        return HistoryTokens(
            payload=payload,
            responses=torch.from_numpy(f.responses),
            response_mask=torch.from_numpy(f.response_mask),
            mask=torch.from_numpy(f.mask),
            gap=torch.from_numpy(f.gap),
        )


def resolved_hist_len(ds: PreparedDataset, hist_len: int | None) -> int:
    """``hist_len``, or the schema's sequence length when None (0 without a sequence)."""
    if hist_len is not None:
        return hist_len
    return ds.schema.sequence.max_len if ds.schema.sequence else 0


def history_index(ds: PreparedDataset) -> HistoryIndex:
    """The history index over every row of a prepared dataset (cached on the dataset object)."""
    cached = getattr(ds, "_history_index", None)
    if cached is None:
        cached = HistoryIndex(
            np.asarray(ds.col(USER_KEY)),
            np.asarray(ds.col(TIMESTAMP)),
            ds.schema.response_delays(),
            ds.response_known_at(),
        )
        ds._history_index = cached  # type: ignore[attr-defined]
    return cached


STACK_CHUNK_ROWS = 1 << 20  # rows copied at a time when stacking: bounded memory at any dataset size


def _stacked_columns(ds: PreparedDataset, lay: FeatureLayout) -> dict[str, np.ndarray]:
    """The column matrices a loader gathers from: one gather per batch instead of one per field. Built once per
    dataset and layout (cached on the dataset object): a run's train, valid and test loaders share them.

    A dataset in memory (``load_into_memory``) gets them in RAM. A memory-mapped one gets them as ``.npy`` files
    under ``<dataset>/stacked/<layout hash>/``, written once (chunk by chunk, published with one rename) and
    memory-mapped: a loader's private memory stays small at any number of rows, the pages being the kernel's
    file cache, which it drops under pressure and reads again."""
    key = (
        tuple(f.name for f in lay.cat_fields),
        tuple(f.name for f in lay.num_fields),
        tuple(f.name for f in lay.multi_fields),
        lay.multi_len,
        tuple(lay.task_labels),
        tuple(lay.responses),
        tuple(lay.seq_cat),
        tuple(lay.seq_multi),
    )
    cache: dict = ds.__dict__.setdefault("_stacked_cache", {})
    if key in cache:
        return cache[key]
    n = ds.n_rows
    seq_cat_idx, seq_multi_idx = lay.sequence_positions()
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    # the sequence matrices have an all-padding row n that empty history positions point at: one gather per
    # batch builds the history, with no per-field selection or masking pass
    layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        "cat": ((n, len(lay.cat_fields)), i32),
        "num": ((n, len(lay.num_fields)), f32),
        "multi": ((n, len(lay.multi_fields), lay.multi_len), i32),
        "labels": ((n, len(lay.task_labels)), f32),
        "responses": ((n, len(lay.responses)), f32),
        "seq_cat": ((n + 1, len(seq_cat_idx)), i32),
        "seq_multi": ((n + 1, len(seq_multi_idx), lay.multi_len), i32),
    }
    out: dict[str, np.ndarray] | None = None
    if isinstance(ds.col(TIMESTAMP), np.memmap):
        digest = hashlib.sha256(repr((key, ds.fingerprint, n)).encode()).hexdigest()[:16]
        try:
            out = _stacked_on_disk(ds, lay, layout, ds.root / "stacked" / digest)
        except OSError as e:  # a read-only dataset folder (or mount): stack in RAM, and say so
            warnings.warn(f"{ds.root}: cannot write stacked columns ({e}); stacking them in RAM", stacklevel=2)
            out = None
    if out is None:
        out = {name: np.zeros(shape, dtype) for name, (shape, dtype) in layout.items()}
        _fill_stacked(ds, lay, out)
    for a in out.values():
        a.flags.writeable = False  # shared: a loader never writes into them
    cache[key] = out
    return out


def _stacked_on_disk(
    ds: PreparedDataset, lay: FeatureLayout, layout: dict[str, tuple[tuple[int, ...], np.dtype]], folder: Path
) -> dict[str, np.ndarray]:
    """Map the stacked files in ``folder``, writing them first when absent. One writer per folder (an flock:
    the other ranks or actors wait, then map its files), staged under a unique name and renamed into place, so
    a reader never sees a half-written folder; a crashed writer's staging folder is removed by the next one."""
    if not (folder / "complete").exists():
        with locked(folder.parent / f".{folder.name}.lock"):
            if not (folder / "complete").exists():
                for stale in folder.parent.glob(f".{folder.name}.*.tmp"):
                    shutil.rmtree(stale, ignore_errors=True)
                tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.tmp"
                tmp.mkdir(parents=True)
                try:
                    arrays: dict[str, np.memmap] = {
                        name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
                        for name, (shape, dtype) in layout.items()
                    }
                    _fill_stacked(ds, lay, arrays)
                    for a in arrays.values():
                        a.flush()
                    del arrays
                    (tmp / "complete").touch()
                    shutil.rmtree(folder, ignore_errors=True)  # a folder without `complete`: a crash's leftover
                    tmp.rename(folder)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in layout}


def _fill_stacked(ds: PreparedDataset, lay: FeatureLayout, out: Mapping[str, np.ndarray]) -> None:
    """Copy the dataset's columns into the stacked matrices, ``STACK_CHUNK_ROWS`` rows at a time (the new
    matrices start zeroed: padding codes, and the padding row n)."""
    seq_cat_idx, seq_multi_idx = lay.sequence_positions()
    labels = [ds.col(label_col(name)) for name in lay.task_labels]
    responses = [ds.response_column(r) for r in lay.responses]
    for start in range(0, ds.n_rows, STACK_CHUNK_ROWS):  # a loop over chunks of a million rows, not rows
        rows = slice(start, min(start + STACK_CHUNK_ROWS, ds.n_rows))
        cat, multi = out["cat"][rows], out["multi"][rows]  # views: written in place
        for i, f in enumerate(lay.cat_fields):
            cat[:, i] = ds.col(cat_col(f.name))[rows]
        for i, f in enumerate(lay.num_fields):
            out["num"][rows, i] = ds.col(num_col(f.name))[rows]
        for i, f in enumerate(lay.multi_fields):
            m = ds.col(multi_col(f.name))[rows]
            multi[:, i, : m.shape[1]] = m
        for i, c in enumerate(labels):
            out["labels"][rows, i] = c[rows]
        for i, c in enumerate(responses):
            out["responses"][rows, i] = c[rows]
        out["seq_cat"][rows] = cat[:, seq_cat_idx]
        out["seq_multi"][rows] = multi[:, seq_multi_idx]
