"""IAT's tokens: the causal export of a source model's instance embeddings into a token store (local, or as a
Ray Data job beside each local function), the cached store per (dataset, source config, seed), appending the
tokens of appended rows, the source-model file saved beside a store, and the ``iat`` token method.

The causal export (default, ``export_order: causal``): the training window is cut by time into ``folds`` folds;
the source model is trained fold after fold, and the instances of fold k are embedded by the state that has
seen folds < k only (see :mod:`sampletok.tokens.iat_source`).

Ray (``pip install 'sampletok[ray]'``) embeds ranges of rows, one task per ``ROWS_PER_TASK``: pre-SIT tokens
depend only on their row and its history, read by every task from the memory-mapped dataset; post-SIT tokens
also depend on the user's window of tokens and stay local.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch

from sampletok.atomic import locked, save_torch
from sampletok.columns import INSTANCE_ID, SPLIT, TIMESTAMP, USER_KEY
from sampletok.data.batches import BatchLoader, TokenSource, history_index
from sampletok.data.dataset import PreparedDataset
from sampletok.data.ray_engine import map_with_ray, ray_module
from sampletok.errors import ConfigError, StoreError, load_torch_dict
from sampletok.features import Batch, FeatureLayout
from sampletok.models.base import RankingModel
from sampletok.models.iat import IAT
from sampletok.nn.inference import map_row_batches
from sampletok.store import LocalTokenStore
from sampletok.store.base import TokenStore
from sampletok.tokenizers.iat import IATSourceConfig, SourceModel
from sampletok.tokens.base import register_method
from sampletok.tokens.iat_source import SourceTrainer, source_quality, train_source, user_windows


@register_method("iat")
class IATTokens:
    """The ``iat`` token method: the store given as the model's ``store``, else the cached causal store of its
    source config and seed (trained and exported on first use, unless ``build=False``)."""

    def __init__(self, model: RankingModel):
        self.model = cast(IAT, model)

    def open(
        self, ds: PreparedDataset, *, seed: int, hist_len: int, build: bool = True, progress: bool = True
    ) -> TokenSource:
        m = self.model
        if m.store_path:
            store = LocalTokenStore.open(m.store_path)
        else:
            store = build_or_load_store(ds, m.source_cfg, seed, m.cache_dir, progress, build=build)
        self.check(store, ds.fingerprint)
        return TokenSource(store.load_into_memory(), m.token_len)

    def check(self, store: TokenStore, dataset: str) -> None:
        m, meta = self.model, store.meta
        if meta.get("dataset") != dataset:
            raise ConfigError(f"{m.store_path}: store was exported for dataset {meta.get('dataset')}, not {dataset}")
        if meta.get("kind") != "iat" or meta["payload_shape"] != [m.source_cfg.emb_dim]:
            raise ConfigError(f"{_where(store)}: not an IAT store of {m.source_cfg.emb_dim}-d embeddings")

    def event_tokenizer(self, tokens: TokenSource, ds: PreparedDataset) -> SourceEventTokenizer:
        cfg = self.model.source_cfg
        if (cfg.export != "pre_sit" and cfg.scheme != "temporal") or cfg.rows_where:
            raise ConfigError(
                "serving appends pre-SIT tokens of every event; this IAT source exports "
                f"{cfg.export} tokens{' of some rows only (rows_where)' if cfg.rows_where else ''}"
            )
        if not isinstance(tokens.store, LocalTokenStore):
            raise StoreError("a trained run's token store is a local one")
        source = load_source_model(tokens.store.root, ds)
        n = source.cfg.hist_len
        if n is None:  # the schema's sequence length, as the offline export's loader resolves it
            n = ds.schema.sequence.max_len if ds.schema.sequence else 0
        return SourceEventTokenizer(source, n)


class SourceEventTokenizer:
    """A served event's IAT token: the final source model's pre-SIT embedding of it and its past events."""

    def __init__(self, source: SourceModel, hist_len: int):
        self.source, self.hist_len = source.eval(), hist_len

    def encode_event(self, batch: Batch) -> np.ndarray:
        return self.source.compress(batch).numpy()


def _where(store: TokenStore) -> str:
    return str(getattr(store, "root", "token store"))


def fold_of_rows(ds: PreparedDataset, cfg: IATSourceConfig) -> np.ndarray:
    """[N] causal-export fold of every row: 0..folds-1 inside the training window (cut by time into folds of
    about equal size; rows with equal timestamps share a fold), ``folds`` after it."""
    ts = np.asarray(ds.col(TIMESTAMP))
    train_rows = ds.rows("train", where=cfg.rows_where)
    out = np.full(ds.n_rows, cfg.folds, np.int64)
    if len(train_rows) == 0:
        return out
    train_ts = ts[train_rows]  # sorted
    cuts = train_ts[(np.arange(1, cfg.folds) * len(train_rows)) // cfg.folds]
    in_window = ts <= train_ts[-1]
    out[in_window] = np.searchsorted(cuts, ts[in_window], side="right")
    return out


def causal_embeddings(
    ds: PreparedDataset,
    cfg: IATSourceConfig,
    seed: int,
    progress: bool = True,
    engine: Literal["local", "ray"] = "local",
) -> tuple[np.ndarray, SourceModel]:
    """[N, emb_dim] tokens of the causal export and the final source model (see the module docstring).

    The state that embeds fold k has trained only on rows whose task labels were *known* before fold k
    starts (``ts + delay <`` its first timestamp): with a label delay, a row of fold k-1 trains in a later
    round, or never when its label arrives after the training window."""
    trainer = SourceTrainer(ds, cfg, seed)
    fold = fold_of_rows(ds, cfg)
    ts = np.asarray(ds.col(TIMESTAMP))
    train_rows = ds.rows("train", where=cfg.rows_where)
    known_at = ts[train_rows] + ds.schema.task_delay
    # start of every fold after k: its first timestamp (a fold can be empty when equal timestamps straddle a
    # cut, then the next non-empty one's); the end of the training window after the last fold
    first_ts = np.full(cfg.folds + 1, int(ts[train_rows].max()) + 1 if len(train_rows) else 0, np.int64)
    inside = fold < cfg.folds
    np.minimum.at(first_ts, fold[inside], ts[inside])
    next_start = np.minimum.accumulate(first_ts[::-1])[::-1][1:]  # [folds]: start of folds k+1.. or window end
    trained = np.zeros(len(train_rows), bool)
    out = np.zeros((ds.n_rows, cfg.emb_dim), np.float32)
    for k in range(cfg.folds + 1):
        rows_k = np.flatnonzero(fold == k)
        if len(rows_k):  # embed fold k with the state trained on labels known before it starts
            out[rows_k] = embed_all(trainer.model, ds, rows=rows_k, progress=progress, engine=engine)
        if k < cfg.folds:
            now = ~trained & (known_at < next_start[k])
            trainer.train(train_rows[now], progress=progress, desc=f" fold {k + 1}/{cfg.folds}")
            trained |= now
    trainer.model.eval()
    return out, trainer.model


def producer_id(model: SourceModel, ds: PreparedDataset | str) -> str:
    """Hash of the source model's weights, config and dataset (or its fingerprint): stored tokens name their
    producer."""
    h = hashlib.sha256()
    h.update(model.cfg.fingerprint().encode())
    h.update((ds if isinstance(ds, str) else ds.fingerprint).encode())
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in sorted(model.state_dict().items())}, buf)
    h.update(buf.getvalue())
    return h.hexdigest()[:16]


def embed_all(
    model: SourceModel,
    ds: PreparedDataset,
    batch_size: int = 1024,
    progress: bool = True,
    workers: int | None = None,
    rows: np.ndarray | None = None,
    engine: Literal["local", "ray"] = "local",
) -> np.ndarray:
    """[len(rows), emb_dim] exported embedding of ``rows`` (default: every row; pre-SIT z, or post-SIT per
    ``cfg.export``), computed on ``workers`` threads (default: every core; see :mod:`sampletok.nn.inference`),
    or with ``engine="ray"`` as a Ray Data job over ranges of rows (pre-SIT only; equal, tested)."""
    model.eval()
    layout = FeatureLayout.from_dataset(ds)
    loader = BatchLoader(
        ds, np.zeros(0, np.int64), batch_size, index=history_index(ds), layout=layout, hist_len=model.cfg.hist_len
    )
    rows = np.arange(ds.n_rows) if rows is None else np.asarray(rows, np.int64)
    if engine == "ray":
        _check_engine(model.cfg, engine)
        return embed_rows_with_ray(model, ds, rows, batch_size)
    if model.cfg.export == "pre_sit" or not model.use_sit:
        out = np.zeros((len(rows), model.cfg.emb_dim), np.float32)

        def embed(idx: np.ndarray) -> None:
            out[idx] = model.compress(loader.build(rows[idx])).numpy()

        map_row_batches(embed, len(rows), batch_size, workers, progress, desc="IAT export")
        return out
    # post-SIT: a token depends on its user window, so whole windows are run and the asked rows picked out
    full = np.zeros((ds.n_rows, model.cfg.emb_dim), np.float32)
    wins = user_windows(
        np.asarray(ds.col(USER_KEY)), np.asarray(ds.col(TIMESTAMP)), np.arange(ds.n_rows), model.cfg.window
    )

    def embed_windows(idx: np.ndarray) -> None:
        w = wins[idx]
        valid = w >= 0
        z_flat = model.compress(loader.build(w[valid]))
        z = z_flat.new_zeros(*w.shape, z_flat.shape[1])
        vm = torch.from_numpy(valid)
        z[vm] = z_flat
        full[w[valid]] = model.run_sit(z, vm)[vm].numpy()

    map_row_batches(
        embed_windows,
        len(wins),
        max(1, batch_size // model.cfg.window),
        workers,
        progress,
        desc="IAT export (post-SIT)",
    )
    return full[rows]


ROWS_PER_TASK = 1 << 20  # IAT: rows a task embeds (its result travels back through Ray's object store)


def embed_rows_with_ray(model: SourceModel, ds: PreparedDataset, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """[len(rows), emb_dim] pre-SIT IAT tokens of ``rows``, one Ray task per ``ROWS_PER_TASK`` of them."""
    out = np.zeros((len(rows), model.cfg.emb_dim), np.float32)
    if len(rows) == 0:
        return out
    state = {"model": ray_module().put(model.eval()), "dataset": str(ds.root.resolve()), "batch_size": batch_size}
    tasks = [{"index": i, "rows": rows[i : i + ROWS_PER_TASK]} for i in range(0, len(rows), ROWS_PER_TASK)]
    for r in map_with_ray(_EmbedRows, state, tasks):
        i = int(r["index"])  # the range's first position in `rows`
        out[i : i + len(r["emb"])] = r["emb"]
    return out


class _EmbedRows:
    """A Ray Data map actor: the source model and the dataset (memory-mapped, with its history index) opened
    once, then the tokens of one range of rows per task."""

    def __init__(self, state: dict[str, Any]):
        import ray

        torch.set_num_threads(1)  # one actor per CPU
        self.model = ray.get(state["model"]).eval()
        ds = PreparedDataset(state["dataset"])
        self.loader = BatchLoader(
            ds, np.zeros(0, np.int64), state["batch_size"], index=history_index(ds), hist_len=self.model.cfg.hist_len
        )
        self.batch_size = state["batch_size"]

    def __call__(self, task: dict[str, Any]) -> dict[str, Any]:
        rows = np.asarray(task["rows"], np.int64)
        parts = []
        with torch.inference_mode():
            for i in range(0, len(rows), self.batch_size):  # a loop over batches, not rows
                parts.append(self.model.compress(self.loader.build(rows[i : i + self.batch_size])).numpy())
        return {"index": task["index"], "emb": np.concatenate(parts).astype(np.float32)}


def _check_engine(cfg: IATSourceConfig, engine: str) -> None:
    """Ray tasks embed ranges of rows: post-SIT tokens, which read the user's window of tokens, stay local."""
    if engine == "ray" and cfg.export == "post_sit" and cfg.scheme != "temporal":  # temporal: no SIT
        raise ConfigError("engine ray embeds rows independently of their windows: it needs export: pre_sit")


def export_to_store(
    model: SourceModel,
    ds: PreparedDataset,
    path: str | Path,
    progress: bool = True,
    chunk: int = 1 << 20,
    embeddings: np.ndarray | None = None,
    engine: Literal["local", "ray"] = "local",
    source_valid: dict[str, float] | None = None,
) -> LocalTokenStore:
    """Write every instance's token, with its labels and their availability times, to a token store.
    ``embeddings`` [N, emb_dim] are the tokens (the causal export's); by default ``model`` embeds every
    instance (in-sample). ``source_valid``: the source model's own validation quality, kept in the store's
    meta (:func:`~sampletok.tokens.iat_source.source_quality`; reports print it)."""
    t0 = time.time()
    emb = embed_all(model, ds, progress=progress, engine=engine) if embeddings is None else embeddings
    seconds = time.time() - t0
    keep = np.flatnonzero(ds.where(model.cfg.rows_where))
    store = LocalTokenStore.create(
        path,
        producer=producer_id(model, ds),
        payload_shape=(model.cfg.emb_dim,),
        response_names=ds.schema.response_names,
        dtype=model.cfg.dtype,
        overwrite=True,
        extra_meta={
            "kind": "iat",
            "ticks_per_second": ds.schema.ticks_per_second,
            "dataset": ds.fingerprint,
            "source_config": model.cfg.model_dump(),
            "export_order": "causal" if embeddings is not None else "in_sample",
            "export_seconds": seconds,
            "export_instances_per_s": ds.n_rows / max(seconds, 1e-9),
            "source_valid": source_valid,
        },
    )
    ts = np.asarray(ds.col(TIMESTAMP))[keep]
    responses = np.stack([np.asarray(ds.response_column(r))[keep] for r in ds.schema.response_names], 1)
    known_at = ds.response_available_at(keep)
    iid, user, emb = np.asarray(ds.col(INSTANCE_ID))[keep], np.asarray(ds.col(USER_KEY))[keep], emb[keep]
    for i in range(0, len(keep), chunk):
        sl = slice(i, i + chunk)
        store.append(iid[sl], user[sl], ts[sl], emb[sl], responses[sl], known_at[sl])
    store.commit()  # the store becomes readable only now, complete
    store.compact()
    return store


def build_or_load_store(
    ds: PreparedDataset,
    cfg: IATSourceConfig,
    seed: int,
    cache_dir: str | Path,
    progress: bool = True,
    build: bool = True,
) -> LocalTokenStore:
    """Train + export once per (dataset, source config, seed); later calls reuse the cached store (only a
    committed, complete one). ``build=False`` refuses to train when the cache has no such store."""
    path = Path(cache_dir) / f"{ds.fingerprint}-{cfg.fingerprint()}-{seed}"
    # one builder per key: a second experiment asking for the same store waits, then reuses it
    with locked(path.parent / f".{path.name}.build-lock"):
        if (path / "CURRENT").exists():
            store = LocalTokenStore.open(path)
            if store.meta.get("dataset") == ds.fingerprint and store.meta.get("source_config") == cfg.model_dump():
                return store
        if not build:
            raise StoreError(
                f"{path}: no IAT token store of this source config and seed (the one the model was "
                "trained with); it is never rebuilt at scoring time: train the model again"
            )
        return build_store(ds, cfg, seed, path, progress)


def build_store(
    ds: PreparedDataset,
    cfg: IATSourceConfig,
    seed: int,
    path: str | Path,
    progress: bool = True,
    engine: Literal["local", "ray"] = "local",
) -> LocalTokenStore:
    """Train a source model and export every instance's token to ``path`` in ``cfg.export_order`` (causal or
    in-sample); the final source model is saved beside the tokens as ``source_model.pt`` (what
    `sampletok iat export` reads)."""
    _check_engine(cfg, engine)  # before the source model trains
    if cfg.export_order == "causal":
        emb, model = causal_embeddings(ds, cfg, seed, progress, engine)
    else:
        model, emb = train_source(ds, cfg, seed, progress), None
    quality = source_quality(model, ds, ds.rows("valid", where=cfg.rows_where))  # never the test split
    store = export_to_store(model, ds, path, progress, embeddings=emb, engine=engine, source_valid=quality)
    saved = {"config": cfg.model_dump(), "state_dict": model.state_dict(), "dataset": ds.fingerprint}
    save_torch(saved, source_model_path(path))
    return store


def append_tokens(path: str | Path, ds: PreparedDataset, progress: bool = True) -> LocalTokenStore:
    """Add the tokens of the rows ``prepare --append`` added to ``ds`` to the IAT store at ``path`` (one new
    committed version), embedded by the store's final source model (``source_model.pt`` beside it).

    Exact when every new row lies after the source model's training window (appended days do: ``append``
    splits by the dataset's cut times): a causal export embeds those rows with its final state too, so the
    grown store equals exporting the grown dataset from scratch (tested). New rows inside the window would need
    the fold states, which are not kept: they are refused (build the store again)."""
    store = LocalTokenStore.open(path)
    if store.meta.get("kind") != "iat":
        raise StoreError(f"{path}: not an IAT token store")
    saved = load_torch_dict(
        source_model_path(path),
        {"config", "state_dict", "dataset"},
        "IAT source model",
        "the store was not written by `iat build`; build it again",
    )
    cfg = IATSourceConfig.model_validate(saved["config"])
    model = SourceModel(FeatureLayout.from_dataset(ds), cfg)
    model.load_state_dict(saved["state_dict"])
    # the producer names the dataset the source model was trained on (saved beside it), not the grown one
    if producer_id(model, str(saved["dataset"])) != store.meta.get("producer"):
        raise StoreError(f"{path}: source_model.pt is not the model that wrote these tokens; build it again")
    keep = np.flatnonzero(ds.where(cfg.rows_where))
    new = keep[~np.isin(np.asarray(ds.col(INSTANCE_ID))[keep], store.read("instance_id"))]
    if (np.asarray(ds.col(SPLIT))[new] == 0).any():
        first = int(new[np.asarray(ds.col(SPLIT))[new] == 0][0])
        raise StoreError(
            f"{path}: dataset row {first} is new and inside the training window, whose tokens come from the "
            "causal export's fold states: build the store again"
        )
    # a token reads its row's history: a new row earlier than a stored row of its user would change that
    # stored token in a rebuild (history is strictly before, so an equal timestamp changes nothing)
    new_user, new_ts = np.asarray(ds.col(USER_KEY))[new], np.asarray(ds.col(TIMESTAMP))[new]
    never = np.full(len(new), np.iinfo(np.int64).max // 4)
    early = store.index.count_before(new_user, never) > store.index.count_before(new_user, new_ts + 1)
    if early.any():
        raise StoreError(
            f"{path}: dataset row {int(new[early][0])} is new and earlier than rows of its user already in the "
            "store, whose tokens read it as history: build the store again"
        )
    if len(new) == 0 and store.meta.get("dataset") == ds.fingerprint:
        return store
    emb = embed_all(model, ds, progress=progress, rows=new) if len(new) else np.zeros((0, cfg.emb_dim), np.float32)
    responses = np.stack([np.asarray(ds.response_column(r))[new] for r in ds.schema.response_names], 1)
    store.append(
        np.asarray(ds.col(INSTANCE_ID))[new],
        np.asarray(ds.col(USER_KEY))[new],
        np.asarray(ds.col(TIMESTAMP))[new],
        emb,
        responses,
        ds.response_available_at(new),
        meta_update={"dataset": ds.fingerprint},  # the store now covers the grown dataset (model_tokens checks)
    )
    return LocalTokenStore.open(path)


def source_model_path(store_path: str | Path) -> Path:
    return Path(store_path) / "source_model.pt"


def load_source_model(store_root: Path, ds: PreparedDataset) -> SourceModel:
    """The source model saved beside an IAT store (its final state: it embeds events after the export)."""
    path = source_model_path(store_root)
    saved = load_torch_dict(path, {"config", "state_dict", "dataset"}, "IAT source model", "export the store again")
    if saved["dataset"] != ds.fingerprint:
        raise StoreError(f"{path}: source model of dataset {saved['dataset']}, not {ds.fingerprint}")
    model = SourceModel(FeatureLayout.from_dataset(ds), IATSourceConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval()
