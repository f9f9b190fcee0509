"""Trainer: Adam, early stopping on validation AUC, learning-rate decay on plateau, checkpoint every epoch
and resume (a killed run resumes and ends with the same result: every epoch reseeds its shuffle and dropout
from ``seed`` and the epoch number).

Example:
    >>> cfg = TrainConfig(max_epochs=1)
    >>> cfg.patience
    2
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from sampletok.data.batches import BatchLoader
from sampletok.models.base import RankingModel
from sampletok.train.metrics import all_metrics


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(1024, ge=1)
    eval_batch_size: int = Field(4096, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_epochs: int = Field(20, ge=1)
    patience: int = Field(2, ge=1, description="epochs without validation AUC gain before stopping")
    lr_decay: float = Field(0.1, gt=0, le=1, description="lr factor after an epoch without improvement")
    hist_len: int | None = Field(None, ge=0, description="history positions (default: schema sequence max_len)")
    train_recent_fraction: float | None = Field(
        None, gt=0, le=1, description="train on the latest fraction (by time) of the train split's requests only; "
        "earlier rows stay history. For long-history runs whose cost per request forbids the whole window")
    grad_clip: float | None = 10.0
    threads: int | None = Field(None, ge=1)


@dataclass
class FitResult:
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    train_samples_per_s: float = 0.0


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@torch.no_grad()
def predict(model: RankingModel, loader: BatchLoader, progress: bool = False) -> tuple[np.ndarray, ...]:
    """(probabilities of the first task label, labels, user keys) over a loader, in loader order."""
    model.eval()
    probs, labels, users = [], [], []
    for batch in tqdm(loader, desc="eval", leave=False, disable=None if progress else True):
        probs.append(torch.sigmoid(model(batch).logits[:, 0]).numpy())
        labels.append(batch.labels[:, 0].numpy())
        users.append(batch.user.numpy())
    return np.concatenate(probs), np.concatenate(labels), np.concatenate(users)


def evaluate(model: RankingModel, loader: BatchLoader, progress: bool = False) -> dict[str, float]:
    p, y, u = predict(model, loader, progress)
    return all_metrics(y, p, u)


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fit(model: RankingModel, train: BatchLoader, valid: BatchLoader, cfg: TrainConfig, seed: int,
        run_dir: str | Path | None = None, resume: bool = True, progress: bool = True) -> FitResult:
    """Train ``model`` in place; the best epoch's weights are restored before returning."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt_path = Path(run_dir) / "checkpoint.pt" if run_dir else None
    state = {"epoch": 0, "best_auc": -1.0, "best_epoch": 0, "best_valid": {}, "bad": 0, "history": [],
             "best_state": None, "seconds": 0.0, "samples": 0}
    if ckpt_path and resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        state = ck["state"]
    kill_after = int(os.environ.get("SAMPLETOK_TEST_KILL_AFTER_EPOCH", "0"))  # test hook: simulates a crash
    while state["epoch"] < cfg.max_epochs and state["bad"] < cfg.patience:
        epoch = state["epoch"]
        torch.manual_seed(seed * 1000 + epoch)
        train.set_epoch(epoch)
        model.train()
        t0, n_seen, loss_sum = time.time(), 0, 0.0
        bar = tqdm(train, desc=f"{model.name} seed {seed} epoch {epoch + 1}", leave=False, disable=None if progress else True)
        for batch in bar:
            out = model(batch)
            loss = F.binary_cross_entropy_with_logits(out.logits, batch.labels)
            total = loss + sum(out.aux_losses.values(), torch.zeros(()))
            opt.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            n_seen += len(batch)
            loss_sum += loss.item() * len(batch)
            bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}")
        state["seconds"] += time.time() - t0
        state["samples"] += n_seen
        metrics = evaluate(model, valid)
        state["history"].append({"epoch": epoch + 1, "train_loss": loss_sum / max(n_seen, 1),
                                 **{f"valid_{k}": v for k, v in metrics.items()},
                                 "lr": opt.param_groups[0]["lr"]})
        if metrics["auc"] > state["best_auc"]:
            state.update(best_auc=metrics["auc"], best_epoch=epoch + 1, best_valid=metrics, bad=0,
                         best_state=copy.deepcopy(model.state_dict()))
        else:
            state["bad"] += 1
            for g in opt.param_groups:
                g["lr"] *= cfg.lr_decay
        state["epoch"] = epoch + 1
        if ckpt_path:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic({"model": model.state_dict(), "optim": opt.state_dict(), "state": state}, ckpt_path)
        if kill_after and state["epoch"] == kill_after:
            os._exit(137)
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    return FitResult(best_epoch=state["best_epoch"], best_valid=state["best_valid"], history=state["history"],
                     train_seconds=state["seconds"],
                     train_samples_per_s=state["samples"] / max(state["seconds"], 1e-9))
