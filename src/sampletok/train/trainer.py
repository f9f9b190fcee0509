"""Trainer: Adam, early stopping on a validation monitor (once an epoch, or ``validations_per_epoch`` times
within it), learning-rate decay on plateau, checkpoint every epoch and resume (a killed run resumes and ends
with the same result: every epoch reseeds its shuffle and dropout from ``seed`` and the epoch number).

The monitor is a weighted sum of validation metrics, FuxiCTR-style. The default ``{auc: 1, logloss: -1}``
stops where AUC stops improving *or* the model's probabilities fall apart: CTR models with ID embeddings
overfit in their second epoch (Zhang et al., CIKM 2022), where train loss collapses, validation LogLoss
explodes and validation AUC may still creep up, so AUC alone keeps the memorized model.

A checkpoint records the fingerprint of the run that wrote it (model, parameters, training config, dataset,
seed); resuming under another fingerprint is refused with one line (``resume=False`` starts afresh).

Example:
    >>> cfg = TrainConfig(max_epochs=1)
    >>> cfg.patience, monitor_score({"auc": 0.75, "logloss": 0.5}, cfg.monitor)
    (2, 0.25)
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from sampletok import distributed
from sampletok.atomic import save_torch
from sampletok.data.batches import BatchLoader
from sampletok.errors import ConfigError, TrainingError
from sampletok.models.base import RankingModel
from sampletok.train.metrics import all_metrics


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(1024, ge=1)
    eval_batch_size: int = Field(4096, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_epochs: int = Field(20, ge=1)
    patience: int = Field(
        2, ge=1, description="validations (epochs, by default) without a better monitor score before stopping"
    )
    monitor: dict[str, float] = Field(
        default_factory=lambda: {"auc": 1.0, "logloss": -1.0},
        description="validation score to maximize: weights of auc, gauc, logloss (FuxiCTR's {AUC: 1, logloss: -1})",
    )
    oov_rate: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="training only: each categorical value of a request (and of its item-ID "
        "history) is replaced by the field's OOV code with this probability, so the OOV row is trained and "
        "unseen users/items at test time get a learned embedding instead of an untouched random one",
    )
    lr_decay: float = Field(0.1, gt=0, le=1, description="lr factor after a validation without improvement")
    validations_per_epoch: int = Field(
        1,
        ge=1,
        description="validations within each epoch, after evenly spaced batches (the last at the epoch's end); "
        "patience and lr_decay count validations, and the best point is reported in epochs (0.25, 0.5, ...). "
        "For logs whose models peak within their first pass, where an epoch-level stop only sees epoch 1",
    )
    hist_len: int | None = Field(None, ge=0, description="history positions (default: schema sequence max_len)")
    train_recent_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="train on the latest fraction (by time) of the train split's requests only; "
        "earlier rows stay history. For long-history runs whose cost per request forbids the whole window",
    )
    calibrate: bool = Field(
        False,
        description="after training, fit Platt scaling (a · logit + b) on the validation "
        "split; monotone, so it changes LogLoss only",
    )
    freeze_embeddings_after: int | None = Field(
        None,
        ge=1,
        description="stop updating every embedding table after this many epochs (the rest of the "
        "model keeps training): the remedy of Zhang et al. (CIKM 2022) for ID embeddings that overfit in epoch 2",
    )
    grad_clip: float | None = 10.0
    threads: int | None = Field(None, ge=1)
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    bf16: bool = Field(False, description="bfloat16 autocast of the forward pass (CUDA, or CPUs that have it)")
    history_buckets: list[int] = Field(
        [10, 50],
        description="evaluation only: test metrics are also reported per bucket of the request's number of "
        "past events (all of the user's earlier rows, not only the hist_len read): < 10, 10-50, >= 50 by default",
    )

    @field_validator("history_buckets")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:], strict=False)) or any(x < 1 for x in v):
            raise ValueError(f"history_buckets must be increasing positive counts, got {v}")
        return v

    def history_bucket_labels(self) -> list[str]:
        """'<10', '10-50', '>=50' for edges [10, 50]."""
        e = self.history_buckets
        if not e:
            return ["all"]
        return [f"<{e[0]}"] + [f"{a}-{b}" for a, b in zip(e, e[1:], strict=False)] + [f">={e[-1]}"]

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got '{v}'")
        return v

    def torch_device(self) -> torch.device:
        """The device to train on; under torchrun each rank takes the GPU of its LOCAL_RANK."""
        if self.device == "auto":
            if not torch.cuda.is_available():
                return torch.device("cpu")
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if distributed.active() else 0)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"train.device is {self.device} but no CUDA device is available here")
        return torch.device(self.device)

    @field_validator("monitor")
    @classmethod
    def _known_metrics(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(MONITOR_METRICS))
        if unknown or not v:
            raise ValueError(f"monitor metrics must be among {list(MONITOR_METRICS)}, got {sorted(v)}")
        return v


MONITOR_METRICS = ("auc", "gauc", "logloss")


def monitor_score(metrics: dict[str, float], weights: dict[str, float]) -> float:
    """The weighted sum the trainer maximizes (NaN when any weighted metric is NaN)."""
    return float(sum(w * metrics[k] for k, w in weights.items()))


@dataclass
class FitResult:
    best_epoch: float  # epochs trained at the best validation (an int at an epoch's end)
    best_valid: dict[str, float]
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    train_samples_per_s: float = 0.0
    stopped: str | None = None  # why training stopped before patience/max_epochs (a NaN monitor)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _device_of(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model: RankingModel, loader: BatchLoader, progress: bool = False) -> tuple[np.ndarray, ...]:
    """(float64 logits of the first task label before calibration, labels, user keys), in loader order."""
    model.eval()
    logits, labels, users = [], [], []
    device = _device_of(model)
    for batch in tqdm(loader, desc="eval", leave=False, disable=None if progress else True):
        logits.append(model(batch.to(device)).logits[:, 0].double().cpu().numpy())
        labels.append(batch.labels[:, 0].numpy())
        users.append(batch.user.numpy())
    z, y, u = (np.concatenate(x) if x else np.zeros(0) for x in (logits, labels, users))
    if distributed.active():  # each rank scored its slice of the rows: every rank gets all of them
        parts = distributed.all_gather_objects((z, y, u))
        z, y, u = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return z, y, u


def predict(model: RankingModel, loader: BatchLoader, progress: bool = False) -> tuple[np.ndarray, ...]:
    """(probabilities of the first task label, labels, user keys) over a loader, in loader order. Computed in
    float64: float32 rounds every logit above ~17 to probability 1.0, which ties confident scores."""
    z, y, u = predict_logits(model, loader, progress)
    return model.calibrated(z), y, u


def fit_calibration(model: RankingModel, loader: BatchLoader) -> tuple[float, float]:
    """Platt scaling: (a, b) minimizing the LogLoss of sigmoid(a · logit + b) on ``loader`` (the validation
    split), with a > 0 (a monotone increasing map never reorders scores, so AUC and GAUC stay); stored in
    ``model.calibration``. Bounded L-BFGS on the raw float64 logits (Newton steps diverge on the near-separable
    logits of an overconfident model)."""
    from scipy.optimize import minimize

    z, y, _ = predict_logits(model, loader)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        s = w[0] * z + w[1]
        # log(1 + e^s) - y s, stably; its gradient is (sigmoid(s) - y) · (z, 1)
        q = 1.0 / (1.0 + np.exp(-s))
        return float(np.mean(np.logaddexp(0.0, s) - y * s)), np.array([np.mean((q - y) * z), np.mean(q - y)])

    w = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=[(1e-3, 1e3), (None, None)]).x
    with torch.no_grad():
        model.calibration.copy_(torch.tensor(w, dtype=torch.float32))
    return float(w[0]), float(w[1])


def evaluate(model: RankingModel, loader: BatchLoader, progress: bool = False) -> dict[str, float]:
    p, y, u = predict(model, loader, progress)
    return all_metrics(y, p, u)


def fit(
    model: RankingModel,
    train: BatchLoader,
    valid: BatchLoader,
    cfg: TrainConfig,
    seed: int,
    run_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    fingerprint: dict | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    on_mismatch: Literal["error", "restart"] = "error",
    on_validation: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Train ``model`` in place; the best validation's weights are restored before returning.

    ``fingerprint`` describes the run (model, params, train config, dataset, seed); a checkpoint in
    ``run_dir`` is resumed only when it was written under the same one (``resume=False`` starts afresh).
    A checkpoint is written at each epoch's end (and where early stopping ends a run inside an epoch), so a
    killed run redoes its current epoch, validations inside it included, and ends with the same result.
    ``on_epoch_end(epoch)`` is called after each epoch's checkpoint is written; ``on_validation(step, score)``
    after every validation (``step``: validations so far, the epoch when ``validations_per_epoch`` is 1) with
    its monitor score (a tuner's pruner reads it and may stop the run by raising)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.torch_device()
    model.to(device)
    # data-parallel under torchrun: gradients all-reduced by DDP (some parameters, e.g. an unused branch, get
    # none in a step); the loader gives each rank its slice of the rows, checkpoints are written by rank 0
    net: torch.nn.Module = model
    if distributed.active():
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt_path = Path(run_dir) / "checkpoint.pt" if run_dir else None
    state: dict[str, Any] = {
        "epoch": 0,
        "best_score": -math.inf,
        "best_epoch": 0,
        "best_valid": {},
        "bad": 0,
        "history": [],
        "best_state": None,
        "seconds": 0.0,
        "samples": 0,
        "stopped": None,
    }
    if ckpt_path and fingerprint is None:
        raise ConfigError(f"{run_dir}: a run folder needs the run's fingerprint (see run_model)")
    ck = (
        torch.load(ckpt_path, weights_only=False, map_location=device)
        if ckpt_path and resume and ckpt_path.exists()
        else None
    )
    if ck is not None and not same_fingerprint(ck.get("fingerprint"), fingerprint):
        if on_mismatch == "error":
            raise ConfigError(
                f"{ckpt_path}: checkpoint of another run ({_fingerprint_diff(ck.get('fingerprint'), fingerprint)}); "
                "pass --restart to train afresh or choose another --out"
            )
        ck = None  # on_mismatch="restart": start this run afresh
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        state = ck["state"]

    def validate(epoch_done: float) -> float:
        """One validation: record it, keep the best weights, decay the lr on no improvement."""
        metrics = evaluate(model, valid)
        score = monitor_score(metrics, cfg.monitor)
        state["history"].append(
            {
                "epoch": epoch_done,
                "train_loss": loss_sum / max(n_seen, 1),
                **{f"valid_{k}": v for k, v in metrics.items()},
                "lr": opt.param_groups[0]["lr"],
                "valid_monitor": score,
            }
        )
        if math.isnan(score):
            # a NaN score is never "no better": stop here and keep the best finite point (or fail below)
            state["stopped"] = f"validation monitor is NaN at epoch {epoch_done} ({metrics})"
        elif score > state["best_score"]:
            state.update(
                best_score=score,
                best_epoch=epoch_done,
                best_valid=metrics,
                bad=0,
                best_state=copy.deepcopy(model.state_dict()),
            )
        else:
            state["bad"] += 1
            for g in opt.param_groups:
                g["lr"] *= cfg.lr_decay
        return score

    def checkpoint() -> None:
        if ckpt_path and distributed.is_main():
            save_torch(
                {"model": model.state_dict(), "optim": opt.state_dict(), "state": state, "fingerprint": fingerprint},
                ckpt_path,
            )
        distributed.barrier()

    while state["epoch"] < cfg.max_epochs and state["bad"] < cfg.patience and not state["stopped"]:
        epoch = state["epoch"]
        if cfg.freeze_embeddings_after is not None and epoch >= cfg.freeze_embeddings_after:
            for m in model.modules():  # frozen tables get no grad, so Adam leaves them as they are
                if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                    m.weight.requires_grad_(False)
        torch.manual_seed(seed * 1000 + epoch)
        train.set_epoch(epoch)
        model.train()
        n_batches = len(train)
        if n_batches == 0:
            raise TrainingError(f"{model.name}: the training split has no batch (no training request selected)")
        # the batch counts after which to validate: evenly spaced, the last at the epoch's end
        k = cfg.validations_per_epoch
        ends = {max(1, round(n_batches * (i + 1) / k)) for i in range(k)}
        t0, n_seen, loss_sum, done, stop = time.time(), 0, 0.0, 0, False
        bar = tqdm(
            train, desc=f"{model.name} seed {seed} epoch {epoch + 1}", leave=False, disable=None if progress else True
        )
        for batch in bar:
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                out = net(batch)
            loss = F.binary_cross_entropy_with_logits(out.logits.float(), batch.labels)
            total = loss + sum(out.aux_losses.values(), torch.zeros((), device=device))
            opt.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            n_seen += len(batch)
            loss_sum += loss.item() * len(batch)
            bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}")
            done += 1
            if done not in ends:
                continue
            # a validation, inside the epoch or at its end; a checkpoint at the end and at a stop
            state["seconds"] += time.time() - t0
            at_end = done == n_batches
            score = validate(epoch + 1 if at_end else round(epoch + done / n_batches, 3))
            stop = state["bad"] >= cfg.patience or bool(state["stopped"])
            if at_end:
                state["epoch"] = epoch + 1
            if at_end or stop:  # a stop inside the epoch ends the run on resume (patience is in the checkpoint)
                state["samples"] += n_seen
                checkpoint()
            if at_end and on_epoch_end is not None:
                on_epoch_end(state["epoch"])
            if on_validation is not None:
                on_validation(len(state["history"]), score)
            if stop:
                break
            model.train()
            t0 = time.time()
        if done < n_batches and not stop:  # a loader that yields fewer batches than its len would loop forever
            raise TrainingError(f"{model.name}: the training loader gave {done} batches of the {n_batches} it counts")
    if state["best_state"] is None:
        raise TrainingError(
            f"{model.name}: no epoch had a finite validation monitor "
            f"({state['stopped'] or 'no epoch ran'}); lower the learning rate or check the data"
        )
    model.load_state_dict(state["best_state"])
    return FitResult(
        best_epoch=state["best_epoch"],
        best_valid=state["best_valid"],
        history=state["history"],
        train_seconds=state["seconds"],
        train_samples_per_s=state["samples"] / max(state["seconds"], 1e-9),
        stopped=state["stopped"],
    )


def _normalized_train(train: Any) -> Any:
    """A fingerprint's training config validated and dumped again, so that a field added since it was written
    reads at its default; a config that no longer validates is left as it is (and so differs)."""
    if not isinstance(train, dict):
        return train
    try:
        return TrainConfig.model_validate(train).model_dump(mode="json")
    except ValueError:
        return train


def same_fingerprint(old: dict | None, new: dict | None) -> bool:
    """Whether two fingerprints (of a run, or of a tuning study) describe the same work. Their ``train`` parts
    are compared validated, so checkpoints and studies written before a training option existed still match a
    run that leaves it at its default, and only a change that matters refuses them.

    >>> old = {"seed": 1, "train": {"lr": 0.01}}
    >>> same_fingerprint(old, {"seed": 1, "train": TrainConfig(lr=0.01).model_dump(mode="json")})
    True
    >>> same_fingerprint(old, {"seed": 1, "train": {"lr": 0.02}})
    False
    """
    if not old or not new:
        return old == new
    return set(old) == set(new) and all(
        (_normalized_train(v) == _normalized_train(new[k])) if k == "train" else v == new[k] for k, v in old.items()
    )


def _fingerprint_diff(old: dict | None, new: dict | None) -> str:
    """Which parts of two run fingerprints differ, in a few words."""
    if not old or not new:
        return "written without a run fingerprint" if not old else "this run has no fingerprint"
    there, now = dict(old), dict(new)
    train_there, train_now = _normalized_train(old.get("train")), _normalized_train(new.get("train"))
    if isinstance(train_there, dict) and isinstance(train_now, dict):  # name the training fields that differ
        del there["train"], now["train"]
        there |= {f"train.{k}": v for k, v in train_there.items()}
        now |= {f"train.{k}": v for k, v in train_now.items()}
    keys = sorted(k for k in set(there) | set(now) if there.get(k) != now.get(k))
    return "; ".join(f"{k}: {there.get(k)!r} there, {now.get(k)!r} now" for k in keys)[:400]
