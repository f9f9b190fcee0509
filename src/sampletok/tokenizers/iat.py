"""IAT stage I: source models that compress every instance into one embedding (InsEmb), and their export.

A source model reads *all* fields of an instance (and the instance's own short behaviour sequence), builds a
wide hidden vector ``h``, compresses it ``z = tanh(W h + b)`` (default 64-d, the stored InsEmb), decompresses
it and predicts the instance's own label. Schemes:

* ``temporal``: instances one by one in global time order (plain streaming training).
* ``user``: batches of user windows (time-sorted runs of one user's instances); a causal Source Instance
  Transformer (SIT) runs over the window's z's and each position predicts its own label. ``two_pass`` trains
  a second pass over the same windows in reverse time order (our reading of the paper's "forward then
  reverse"). The **pre-SIT** z is exported by default (``export: post_sit`` is the ablation).
* ``user_stream``: rows in global time order; the user's previous T-1 embeddings are read from the already
  written rows (gradients stopped) and only the current instance is updated, as a production stream would.

The source model is trained on the training window only. How it embeds the instances (``export_order``):

* ``causal`` (default): the training window is cut by time into ``folds`` folds; the model is trained fold
  after fold (warm-started, one optimizer, as a production stream trains day after day), and the instances
  of fold k are embedded by the state that has seen folds < k only (fold 0 by the initial, untrained state);
  everything after the training window by the final state. No token of a request's past was made by a model
  that saw that request's label (or any later one).
* ``in_sample`` (the ablation): one model trained on the whole window embeds everything. A training-window
  token then comes from parameters fitted on the labels of *later* instances of the same user (the user-ID
  embedding, the SIT loss at later positions), so downstream training requests read tokens that carry their
  own future while test requests read out-of-sample tokens.

``z`` reads only the instance's own features and its own past rows (never a label).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from sampletok.atomic import locked, save_torch
from sampletok.data.batches import BatchLoader, history_index
from sampletok.data.history import HistoryIndex
from sampletok.data.prepare import PreparedDataset
from sampletok.errors import ConfigError, StoreError, load_torch_dict
from sampletok.features import Batch, FeatureLayout
from sampletok.nn import MLP, FeatureEmbedding, TargetAttention, TransformerBlock
from sampletok.nn.inference import map_row_batches
from sampletok.store import LocalTokenStore


class IATSourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    scheme: Literal["temporal", "user", "user_stream"] = "user"
    emb_dim: int = Field(64, ge=1, description="InsEmb width (the stored token)")
    embed_dim: int = Field(16, ge=1)
    hidden: list[int] = Field(default_factory=lambda: [512, 256], description="trunk; last = width of h")
    decompress: list[int] = Field(default_factory=lambda: [128])
    sit_layers: int = Field(2, ge=1)
    sit_heads: int = Field(2, ge=1)
    window: int = Field(64, ge=2, description="user-order: instances per user window")
    hist_len: int | None = Field(
        None,
        ge=0,
        description="length of the instance's own short behaviour sequence (None: the schema's sequence max_len)",
    )
    stream_context: int = Field(63, ge=1, description="user_stream: previous embeddings read (T-1)")
    two_pass: bool = False
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(1024, ge=1, description="instances per step")
    lr: float = 1e-3
    export: Literal["pre_sit", "post_sit"] = "pre_sit"
    export_order: Literal["causal", "in_sample"] = Field(
        "causal",
        description="causal: fold k's tokens from the state trained on folds < k; in_sample: one model "
        "trained on the whole training window embeds every instance (leaks later labels into training tokens)",
    )
    folds: int = Field(8, ge=2, description="causal export: time folds of the training window")
    dtype: Literal["float16", "float32", "int8"] = "float16"
    rows_where: dict[str, list] | None = Field(
        None,
        description="train on / export only instances whose fields "
        "take these values (e.g. a source domain for transfer)",
    )

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:12]


class SourceModel(nn.Module):
    """Ranking trunk over all fields → bottleneck z → decompress → head; optional causal SIT over z's."""

    def __init__(self, layout: FeatureLayout, cfg: IATSourceConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = FeatureEmbedding(layout, cfg.embed_dim)
        self.has_seq = bool(layout.seq_cat or layout.seq_multi)
        seq_dim = self.embed.seq_dim if self.has_seq else 0
        self.attention = TargetAttention(seq_dim) if self.has_seq else None
        self.trunk = MLP(self.embed.n_tokens * cfg.embed_dim + seq_dim, list(cfg.hidden))
        self.bottleneck = nn.Linear(self.trunk.out_dim, cfg.emb_dim)
        self.decomp = MLP(cfg.emb_dim, list(cfg.decompress))
        self.sit = nn.ModuleList(TransformerBlock(cfg.emb_dim, cfg.sit_heads) for _ in range(cfg.sit_layers))
        self.use_sit = cfg.scheme != "temporal"
        n_tasks = len(layout.task_labels)
        self.head = nn.Linear(self.decomp.out_dim + (cfg.emb_dim if self.use_sit else 0), n_tasks)

    def compress(self, batch: Batch) -> torch.Tensor:
        """[B, emb_dim] InsEmb of each instance in the batch."""
        x = self.embed(batch).flatten(1)
        if self.attention is not None:  # the schema has a behaviour sequence
            interest = self.attention(self.embed.target_item(batch), self.embed.history(batch), batch.hist_mask)
            x = torch.cat([x, interest], dim=1)
        return torch.tanh(self.bottleneck(self.trunk(x)))

    def run_sit(self, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Causal SIT over [B, S, d] z's (valid [B, S]); position t sees positions <= t only."""
        s = z.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=z.device).tril()
        mask = causal.unsqueeze(0) & valid.unsqueeze(1)
        mask = mask | torch.eye(s, dtype=torch.bool, device=z.device)  # never an empty row
        x = z
        for block in self.sit:
            x = block(x, mask)
        return x

    def predict(self, z: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        parts = [self.decomp(z)]
        if self.use_sit:
            parts.append(context if context is not None else torch.zeros_like(z))
        return self.head(torch.cat(parts, dim=-1))

    def sit_last(self, prev_z: torch.Tensor, prev_mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Streaming form: SIT output of the current instance given the previous embeddings (no grad)."""
        seq = torch.cat([prev_z.detach(), z.unsqueeze(1)], dim=1)
        valid = torch.cat([prev_mask, prev_mask.new_ones(len(z), 1)], dim=1)
        return self.run_sit(seq, valid)[:, -1]


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


def user_windows(user: np.ndarray, ts: np.ndarray, rows: np.ndarray, window: int) -> np.ndarray:
    """[W, window] row ids (-1 padded): each user's rows sorted by time, cut into consecutive windows."""
    rows = np.asarray(rows, np.int64)
    order = np.lexsort((rows, ts[rows], user[rows]))
    r = rows[order]
    u = user[r]
    start = np.r_[True, u[1:] != u[:-1]]
    first = np.maximum.accumulate(np.where(start, np.arange(len(r)), 0))
    pos = np.arange(len(r)) - first
    new_win = start | (pos % window == 0)
    win_id = np.cumsum(new_win) - 1
    out = np.full((int(win_id[-1]) + 1 if len(r) else 0, window), -1, np.int64)
    out[win_id, pos % window] = r
    return out


def _bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, labels)


def train_source(ds: PreparedDataset, cfg: IATSourceConfig, seed: int, progress: bool = True) -> SourceModel:
    """Train a source model on the whole training window under ``cfg.scheme`` (the in-sample model)."""
    trainer = SourceTrainer(ds, cfg, seed)
    trainer.train(ds.rows("train", where=cfg.rows_where), progress=progress)
    trainer.model.eval()
    return trainer.model


class SourceTrainer:
    """A source model and its optimizer, trained on successive sets of rows (the whole window, or fold after
    fold for the causal export)."""

    def __init__(self, ds: PreparedDataset, cfg: IATSourceConfig, seed: int):
        torch.manual_seed(seed)
        self.ds, self.cfg, self.seed = ds, cfg, seed
        self.layout = FeatureLayout.from_dataset(ds)
        self.model = SourceModel(self.layout, cfg)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.loader = BatchLoader(
            ds,
            np.zeros(0, np.int64),
            cfg.batch_size,
            index=history_index(ds),
            layout=self.layout,
            hist_len=cfg.hist_len,
        )
        self.steps = 0  # rounds of ``train`` so far: seeds differ from fold to fold

    def train(self, rows: np.ndarray, progress: bool = True, desc: str = "") -> None:
        """``cfg.epochs`` epochs over ``rows`` (time-ordered request rows)."""
        cfg, model, opt, loader, ds = self.cfg, self.model, self.opt, self.loader, self.ds
        user, ts = np.asarray(ds.col("_user_key")), np.asarray(ds.col("_ts"))
        model.train()
        for epoch in range(cfg.epochs):
            round_seed = self.seed * 1000 + self.steps * 100 + epoch
            torch.manual_seed(round_seed)
            if len(rows) == 0:
                continue
            if cfg.scheme == "temporal":
                n_steps = (len(rows) + cfg.batch_size - 1) // cfg.batch_size
                for i in tqdm(
                    range(0, len(rows), cfg.batch_size),
                    total=n_steps,
                    leave=False,
                    desc=f"IAT source (temporal){desc} epoch {epoch + 1}",
                    disable=None if progress else True,
                ):
                    batch = loader.build(rows[i : i + cfg.batch_size])
                    loss = _bce(model.predict(model.compress(batch), None), batch.labels)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            elif cfg.scheme == "user":
                wins = user_windows(user, ts, rows, cfg.window)
                passes = [False, True] if cfg.two_pass else [False]
                per_step = max(1, cfg.batch_size // cfg.window)
                rng = np.random.default_rng(self.seed * 7919 + self.steps * 101 + epoch)
                for reverse in passes:
                    order = rng.permutation(len(wins))
                    for i in tqdm(
                        range(0, len(wins), per_step),
                        desc=f"IAT source (user{' rev' if reverse else ''}){desc} epoch {epoch + 1}",
                        leave=False,
                        disable=None if progress else True,
                    ):
                        w = wins[order[i : i + per_step]]
                        if reverse:  # reverse time order inside each window, padding stays at the end
                            lens = (w >= 0).sum(1)
                            idx = lens[:, None] - 1 - np.arange(w.shape[1])[None, :]
                            w = np.where(idx >= 0, np.take_along_axis(w, np.maximum(idx, 0), 1), -1)
                        loss = _window_loss(model, loader, w)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
            else:  # user_stream
                _train_stream_epoch(model, opt, loader, ds, rows, cfg, progress, epoch)
        self.steps += 1
        model.eval()


def fold_of_rows(ds: PreparedDataset, cfg: IATSourceConfig) -> np.ndarray:
    """[N] causal-export fold of every row: 0..folds-1 inside the training window (cut by time into folds of
    about equal size; rows with equal timestamps share a fold), ``folds`` after it."""
    ts = np.asarray(ds.col("_ts"))
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
    ts = np.asarray(ds.col("_ts"))
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


def _window_loss(model: SourceModel, loader: BatchLoader, w: np.ndarray) -> torch.Tensor:
    valid = w >= 0
    batch = loader.build(w[valid])
    z_flat = model.compress(batch)
    z = z_flat.new_zeros(*w.shape, z_flat.shape[1])
    vm = torch.from_numpy(valid)
    z[vm] = z_flat
    ctx = model.run_sit(z, vm)[vm]
    return _bce(model.predict(z_flat, ctx), batch.labels)


def _train_stream_epoch(
    model: SourceModel,
    opt,
    loader: BatchLoader,
    ds: PreparedDataset,
    rows: np.ndarray,
    cfg: IATSourceConfig,
    progress: bool,
    epoch: int,
) -> None:
    """Global time order; previous embeddings come from what was already written (stop-gradient)."""
    n = ds.n_rows
    buffer = np.zeros((n, cfg.emb_dim), np.float32)
    written = np.zeros(n, bool)
    idx = HistoryIndex(np.asarray(ds.col("_user_key"))[rows], np.asarray(ds.col("_ts"))[rows])
    for i in tqdm(
        range(0, len(rows), cfg.batch_size),
        desc=f"IAT source (stream) epoch {epoch + 1}",
        leave=False,
        disable=None if progress else True,
    ):
        cur = rows[i : i + cfg.batch_size]
        batch = loader.build(cur)
        h = idx.fetch(batch.user.numpy(), batch.ts.numpy(), cfg.stream_context)
        prev_rows = np.where(h.mask, rows[np.where(h.mask, h.rows, 0)], 0)
        prev_mask = h.mask & written[prev_rows]  # rows not yet written (same batch) are not in the store yet
        z = model.compress(batch)
        ctx = model.sit_last(torch.from_numpy(buffer[prev_rows]), torch.from_numpy(prev_mask), z)
        loss = _bce(model.predict(z, ctx), batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        buffer[cur] = z.detach().numpy()
        written[cur] = True


@torch.no_grad()
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
        from sampletok.tokenizers.ray_export import embed_rows_with_ray

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
        np.asarray(ds.col("_user_key")), np.asarray(ds.col("_ts")), np.arange(ds.n_rows), model.cfg.window
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
) -> LocalTokenStore:
    """Write every instance's token, with its labels and their availability times, to a token store.
    ``embeddings`` [N, emb_dim] are the tokens (the causal export's); by default ``model`` embeds every
    instance (in-sample)."""
    t0 = time.time()
    emb = embed_all(model, ds, progress=progress, engine=engine) if embeddings is None else embeddings
    seconds = time.time() - t0
    keep = np.flatnonzero(ds.where(model.cfg.rows_where))
    store = LocalTokenStore.create(
        path,
        producer=producer_id(model, ds),
        payload_shape=(model.cfg.emb_dim,),
        label_names=ds.schema.response_names,
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
        },
    )
    ts = np.asarray(ds.col("_ts"))[keep]
    side = np.stack([np.asarray(ds.response_column(r))[keep] for r in ds.schema.response_names], 1)
    avail = ds.response_available_at(keep)
    iid, user, emb = np.asarray(ds.col("_instance_id"))[keep], np.asarray(ds.col("_user_key"))[keep], emb[keep]
    for i in range(0, len(keep), chunk):
        sl = slice(i, i + chunk)
        store.append(iid[sl], user[sl], ts[sl], emb[sl], side[sl], avail[sl])
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
    store = export_to_store(model, ds, path, progress, embeddings=emb, engine=engine)
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
    new = keep[~np.isin(np.asarray(ds.col("_instance_id"))[keep], store._key_column("instance_id"))]
    if (np.asarray(ds.col("_split"))[new] == 0).any():
        first = int(new[np.asarray(ds.col("_split"))[new] == 0][0])
        raise StoreError(
            f"{path}: dataset row {first} is new and inside the training window, whose tokens come from the "
            "causal export's fold states: build the store again"
        )
    # a token reads its row's history: a new row earlier than a stored row of its user would change that
    # stored token in a rebuild (history is strictly before, so an equal timestamp changes nothing)
    new_user, new_ts = np.asarray(ds.col("_user_key"))[new], np.asarray(ds.col("_ts"))[new]
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
    side = np.stack([np.asarray(ds.response_column(r))[new] for r in ds.schema.response_names], 1)
    store.append(
        np.asarray(ds.col("_instance_id"))[new],
        np.asarray(ds.col("_user_key"))[new],
        np.asarray(ds.col("_ts"))[new],
        emb,
        side,
        ds.response_available_at(new),
        meta_update={"dataset": ds.fingerprint},  # the store now covers the grown dataset (model_tokens checks)
    )
    return LocalTokenStore.open(path)


def source_model_path(store_path: str | Path) -> Path:
    return Path(store_path) / "source_model.pt"
