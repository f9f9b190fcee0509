"""Training IAT's source model (:class:`~sampletok.tokenizers.iat.SourceModel`) on a prepared dataset under
each scheme; the same trainer, fold after fold, makes the causal export (:mod:`sampletok.tokens.iat`).

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
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sampletok.columns import TIMESTAMP, USER_KEY
from sampletok.data.batches import BatchLoader, history_index
from sampletok.data.dataset import PreparedDataset
from sampletok.features import FeatureLayout
from sampletok.history import HistoryIndex
from sampletok.tokenizers.iat import IATSourceConfig, SourceModel


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
        user, ts = np.asarray(ds.col(USER_KEY)), np.asarray(ds.col(TIMESTAMP))
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


def _window_logits(model: SourceModel, loader: BatchLoader, w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of the instances of user windows ``w`` (each position sees the window's earlier ones)."""
    valid = w >= 0
    batch = loader.build(w[valid])
    z_flat = model.compress(batch)
    z = z_flat.new_zeros(*w.shape, z_flat.shape[1])
    vm = torch.from_numpy(valid)
    z[vm] = z_flat
    ctx = model.run_sit(z, vm)[vm]
    return model.predict(z_flat, ctx), batch.labels


def _window_loss(model: SourceModel, loader: BatchLoader, w: np.ndarray) -> torch.Tensor:
    return _bce(*_window_logits(model, loader, w))


@torch.no_grad()
def source_quality(model: SourceModel, ds: PreparedDataset, rows: np.ndarray) -> dict[str, float]:
    """The source model's own prediction of the first task label on ``rows`` (the validation split: rows it
    never trained on), as AUC and LogLoss: how much a token can carry. The user-order schemes read each
    instance's earlier instances in its user window of ``rows`` through the SIT, as in training.

    Example:
        >>> from sampletok.data.sources.synthetic import SyntheticConfig, generate_source
        >>> from sampletok.data.prepare import prepare
        >>> import tempfile
        >>> src, schema = generate_source(SyntheticConfig(n_users=30, events_per_user=12, n_items=40))
        >>> ds = prepare(src, schema, tempfile.mkdtemp(), progress=False)
        >>> cfg = IATSourceConfig(epochs=1, hidden=[16], emb_dim=8)
        >>> q = source_quality(train_source(ds, cfg, seed=0, progress=False), ds, ds.rows("valid"))
        >>> sorted(q), 0.0 <= q["auc"] <= 1.0
        (['auc', 'logloss', 'rows'], True)
    """
    from sampletok.train.metrics import auc, logloss

    cfg = model.cfg
    loader = BatchLoader(
        ds, np.zeros(0, np.int64), cfg.batch_size, index=history_index(ds), layout=FeatureLayout.from_dataset(ds),
        hist_len=cfg.hist_len,
    )  # fmt: skip
    model.eval()
    logits, labels = [], []
    if cfg.scheme == "temporal":
        for i in range(0, len(rows), cfg.batch_size):
            batch = loader.build(rows[i : i + cfg.batch_size])
            logits.append(model.predict(model.compress(batch), None))
            labels.append(batch.labels)
    else:
        wins = user_windows(np.asarray(ds.col(USER_KEY)), np.asarray(ds.col(TIMESTAMP)), rows, cfg.window)
        per_step = max(1, cfg.batch_size // cfg.window)
        for i in range(0, len(wins), per_step):
            out, target = _window_logits(model, loader, wins[i : i + per_step])
            logits.append(out)
            labels.append(target)
    if not logits:
        return {"auc": float("nan"), "logloss": float("nan"), "rows": 0}
    p = torch.sigmoid(torch.cat(logits)[:, 0]).double().numpy()
    y = torch.cat(labels)[:, 0].double().numpy()
    return {"auc": float(auc(y, p)), "logloss": float(logloss(y, p)), "rows": int(len(y))}


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
    idx = HistoryIndex(np.asarray(ds.col(USER_KEY))[rows], np.asarray(ds.col(TIMESTAMP))[rows])
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
