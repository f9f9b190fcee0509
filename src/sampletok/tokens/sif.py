"""SIF's tokens: the frozen export of every instance's HGAQ codes into a token store (one segment per range of
rows, locally or as a Ray Data job beside the local function), and the ``sif`` token method (a SIF with a code
store reads its history rows' codes instead of quantizing the past samples).

With Ray (``pip install 'sampletok[ray]'``) the driver creates the staged token store and puts the frozen
model in Ray's object store; each task opens the prepared dataset (memory-mapped) and the staged store, encodes
its rows with :func:`code_segment` (the local engine's function) and writes them as one segment. The driver
adds the segments in row order and commits once: a failed task fails the job before the commit, so readers
keep the previous store. The store's folder must be on a filesystem every worker sees.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch

from sampletok.columns import INSTANCE_ID, TIMESTAMP, USER_KEY
from sampletok.data.batches import BatchLoader, TokenSource
from sampletok.data.dataset import PreparedDataset
from sampletok.data.ray_engine import map_with_ray, ray_module
from sampletok.errors import StoreError
from sampletok.features import Batch
from sampletok.history import HistoryIndex
from sampletok.models.base import RankingModel
from sampletok.models.sif import SIF
from sampletok.nn.inference import map_row_batches
from sampletok.store import LocalTokenStore
from sampletok.store.base import TokenStore
from sampletok.tokenizers.hgaq import code_dtype
from sampletok.tokens.base import register_method


@register_method("sif")
class SIFTokens:
    """The ``sif`` token method: the exported code store given as the model's ``store``, one code row per
    history position, refused unless made with this model's codebooks."""

    def __init__(self, model: RankingModel):
        self.model = cast(SIF, model)

    def open(
        self, ds: PreparedDataset, *, seed: int, hist_len: int, build: bool = True, progress: bool = True
    ) -> TokenSource:
        assert self.model.store_path is not None  # the model declares a token input only with a store
        store = LocalTokenStore.open(self.model.store_path).load_into_memory()
        self.check(store, ds.fingerprint)
        return TokenSource(store, hist_len, dequantize=False)

    def check(self, store: TokenStore, dataset: str) -> None:
        self.model.check_code_store(store.meta, dataset)

    def event_tokenizer(self, tokens: TokenSource, ds: PreparedDataset) -> CodeEventTokenizer:
        return CodeEventTokenizer(self.model)


class CodeEventTokenizer:
    """A served event's SIF codes [1, T, M]: its own sample quantized (no history)."""

    hist_len = 0

    def __init__(self, model: SIF):
        self.model = model

    def encode_event(self, batch: Batch) -> np.ndarray:
        return self.model.tokenizer.encode(batch, self.model.history_keep)


def export_codes(
    model: SIF,
    ds: PreparedDataset,
    path: str | Path,
    batch_size: int = 8192,
    progress: bool = True,
    workers: int | None = 1,
    append: bool = False,
    engine: Literal["local", "ray"] = "local",
    rows_per_segment: int = 1 << 22,
) -> LocalTokenStore:
    """Frozen export: every instance's codes [T, M] (+ labels and availability) into a token store, one segment
    per ``rows_per_segment`` rows (memory bounded by a segment at any dataset size), committed once.

    ``append``: the store at ``path`` holds this model's codes of the dataset's first rows (an export made before
    ``prepare --append`` grew it): only the new rows are encoded, and the store is committed anew with all of
    them (one atomic version; readers of the old one keep it). A store of other codebooks or other rows is
    refused.

    ``engine="ray"``: each segment is a Ray task (:func:`encode_segments_with_ray`) that encodes its rows
    and writes its segment; the driver adds them in row order and commits, so a failed task leaves the previous
    store as it was. The store equals the local engine's (tested).

    ``workers=1`` (default) encodes batch after batch with torch's intra-op threads: the [T, 1024, V] distance
    blocks are large enough to split; on 2 cores 2 worker threads were slower before the lean
    ``ResidualVQ.encode`` (120-152k vs 147-173k samples/s) and equal after it (228k vs 224-238k,
    ``benchmarks/bench_sif.py --sections encode``), unlike the IAT export's small ops."""

    model.eval()
    t, m = model.tokenizer.n_tokens, model.cfg.levels
    store = LocalTokenStore.create(
        path,
        producer=model.tokenizer.rvq.version(),
        payload_shape=(t, m),
        response_names=ds.schema.response_names,
        dtype="uint8" if model.cfg.codes <= 256 else "uint16",
        overwrite=True,
        extra_meta={
            "kind": "sif",
            "ticks_per_second": ds.schema.ticks_per_second,
            "dataset": ds.fingerprint,
            "codebook_version": model.tokenizer.rvq.version(),
            "hgaq": model.cfg.model_dump(),
            "history_fields": _history_fields(model),  # the fields a history row's codes were made from
        },
    )
    done = _reuse_stored_codes(model, ds, path, store, rows_per_segment) if append else 0
    ranges = [(lo, min(lo + rows_per_segment, ds.n_rows)) for lo in range(done, ds.n_rows, rows_per_segment)]
    t0 = time.time()
    if engine == "ray":
        names = encode_segments_with_ray(model, ds, store, ranges, batch_size)
    else:
        loader = no_history_loader(ds)
        names = [
            code_segment(model, ds, loader, store, lo, hi, batch_size, workers, progress and len(ranges) == 1)
            for lo, hi in ranges
        ]
    store.add_segments(names)
    sec = time.time() - t0
    store.update_meta(export_instances_per_s=(ds.n_rows - done) / max(sec, 1e-9), rows_reused=done)
    store.commit()
    return store


def no_history_loader(ds: PreparedDataset) -> BatchLoader:
    """A loader of single rows (hist_len 0): it needs no index of the dataset's histories (sorting every row),
    only one of the right response count, which never finds a row."""
    none = HistoryIndex(np.zeros(1, np.int64), np.full(1, np.iinfo(np.int64).max // 4), ds.schema.response_delays())
    return BatchLoader(ds, np.zeros(0, np.int64), hist_len=0, index=none)


def code_segment(
    model: SIF,
    ds: PreparedDataset,
    loader: BatchLoader,
    store: LocalTokenStore,
    lo: int,
    hi: int,
    batch_size: int,
    workers: int | None = 1,
    progress: bool = False,
) -> str:
    """Encode dataset rows [lo, hi) and write them as one segment of the staged ``store``; its name."""
    codes = np.zeros((hi - lo, model.tokenizer.n_tokens, model.cfg.levels), code_dtype(model.cfg.codes))

    def encode(rows: np.ndarray) -> None:
        codes[rows] = model.tokenizer.encode(loader.build(rows + lo), model.history_keep)

    map_row_batches(encode, hi - lo, batch_size, workers, progress, desc="SIF export")
    rows = slice(lo, hi)
    responses = np.stack([np.asarray(ds.response_column(r)[rows]) for r in ds.schema.response_names], 1)
    return store.write_segment(
        np.asarray(ds.col(INSTANCE_ID)[rows]),
        np.asarray(ds.col(USER_KEY)[rows]),
        np.asarray(ds.col(TIMESTAMP)[rows]),
        codes,
        responses,
        ds.response_available_at(np.arange(lo, hi)),
    )


def encode_segments_with_ray(
    model: SIF, ds: PreparedDataset, store: LocalTokenStore, ranges: list[tuple[int, int]], batch_size: int
) -> list[str]:
    """Encode each row range [lo, hi) of ``ds`` as one segment of the staged ``store`` in a Ray task; the
    segments' names in the order of ``ranges``."""
    if not ranges:
        return []
    state = {
        "model": ray_module().put(model),
        "dataset": str(ds.root.resolve()),
        "store": str(store.root.resolve()),
        "manifest": store.manifest,
        "batch_size": batch_size,
    }
    tasks = [{"index": i, "lo": lo, "hi": hi} for i, (lo, hi) in enumerate(ranges)]
    return [r["segment"] for r in map_with_ray(_EncodeSegment, state, tasks)]


class _EncodeSegment:
    """A Ray Data map actor: the model, dataset and staged store opened once, then one segment per task."""

    def __init__(self, state: dict[str, Any]):
        import ray

        torch.set_num_threads(1)  # one actor per CPU
        self.model = ray.get(state["model"]).eval()
        self.ds = PreparedDataset(state["dataset"])
        self.loader = no_history_loader(self.ds)
        self.store = LocalTokenStore(Path(state["store"]), state["manifest"], "", staged=True)
        self.batch_size = state["batch_size"]

    def __call__(self, task: dict[str, Any]) -> dict[str, Any]:
        name = code_segment(
            self.model, self.ds, self.loader, self.store, task["lo"], task["hi"], self.batch_size, workers=1
        )
        return {"index": task["index"], "segment": name}


def _history_fields(model: SIF) -> list[str] | None:
    keep = model.history_keep
    names = model.layout.field_names
    return None if keep is None else [n for n, k in zip(names, keep.tolist(), strict=True) if k]


def _reuse_stored_codes(
    model: SIF, ds: PreparedDataset, path: str | Path, store: LocalTokenStore, rows_per_segment: int
) -> int:
    """Copy the codes an earlier export of the same model holds for the dataset's first rows into segments of
    the new staged ``store``; return how many rows they cover (0 when there is no store yet)."""
    if not LocalTokenStore.exists(path):
        return 0
    old = LocalTokenStore.open(path)
    same_model = (
        old.meta.get("codebook_version") == model.tokenizer.rvq.version()
        and old.meta.get("hgaq") == json.loads(json.dumps(model.cfg.model_dump()))
        and old.meta.get("history_fields") == _history_fields(model)
    )
    if old.meta.get("kind") != "sif" or not same_model:
        raise StoreError(f"{path}: not codes of this model's codebooks; export without append")
    k = len(old)
    ids = old.read("instance_id")
    if k > ds.n_rows or not np.array_equal(ids, np.asarray(ds.col(INSTANCE_ID))[:k]):
        raise StoreError(f"{path}: holds other rows than the dataset's first {k}; export without append")
    names = []
    for lo in range(0, k, rows_per_segment):
        rows = np.arange(lo, min(lo + rows_per_segment, k))
        names.append(
            store.write_segment(
                ids[rows],
                old.read("user", rows),
                old.read("ts", rows),
                old.read("payload", rows),
                old.read("responses", rows),
                old.read("known_at", rows),
            )
        )
    store.add_segments(names)
    return k
