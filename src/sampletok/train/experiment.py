"""Experiments as data: a YAML names the dataset, the models (with parameters), the training set-up and
the seeds. ``run_model`` trains and tests one (model, seed); ``compare`` is a loop over them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sampletok import distributed
from sampletok.atomic import save_json, save_torch
from sampletok.columns import TIMESTAMP, USER_KEY
from sampletok.data.batches import BatchLoader, TokenSource, history_index, resolved_hist_len
from sampletok.data.dataset import IN_MEMORY_MAX_ROWS, PreparedDataset, SplitSpec
from sampletok.data.prepare import prepare
from sampletok.errors import ConfigError, StoreError, load_torch_dict, load_yaml_mapping, one_line, validated
from sampletok.errors import validation_message as _errors
from sampletok.features import FeatureLayout
from sampletok.models import build_model
from sampletok.models.base import model_config
from sampletok.search_space import _space_field
from sampletok.tokens import open_tokens
from sampletok.train.metrics import all_metrics
from sampletok.train.trainer import MONITOR_METRICS, TrainConfig, evaluate, fit, fit_calibration, predict, set_seed

if TYPE_CHECKING:
    from sampletok.models.base import RankingModel


class DatasetConfig(BaseModel):
    """Where the raw samples come from and where the prepared copy lives."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["movielens", "kuairand", "files", "synthetic", "prepared"]
    path: str | None = Field(None, description="MovieLens or KuaiRand folder, data file(s), or a prepared directory")
    schema_path: str | None = Field(None, description="schema YAML (kind: files)")
    synthetic: dict[str, Any] = Field(default_factory=dict, description="SyntheticConfig fields")
    prepared_dir: str | None = None
    split: SplitSpec = SplitSpec()


# ------------------------------------------------------------------ `sampletok tune` sections (sampletok.train.tune)
class ModelTune(BaseModel):
    """A model spec's ``tune:``: ``space`` overrides or adds dimensions of the declared space (``null`` drops
    one), ``only`` keeps the listed keys."""

    model_config = ConfigDict(extra="forbid")
    space: dict[str, Any] = Field(default_factory=dict)
    only: list[str] | None = Field(None, min_length=1)

    @field_validator("space", mode="before")
    @classmethod
    def _checked(cls, v: Any) -> dict[str, Any]:
        return _space_field(v)


class TuneConfig(BaseModel):
    """An experiment's ``tune:`` section (every model gets the same budget)."""

    model_config = ConfigDict(extra="forbid")
    trials: int = Field(20, ge=1, description="trials per model: the same budget for every model")
    metric: dict[str, float] | None = Field(
        None,
        description="validation score to maximize, as TrainConfig.monitor weights (default: the train monitor); "
        "it is the monitor of the trials and of the tuned reruns",
    )
    seed: int = Field(0, description="TPE sampler seed (trial k is sampled with seed + k)")
    startup_trials: int = Field(10, ge=1, description="random trials before TPE models the space")
    pruner: Literal["median", "none"] = "median"
    prune_startup: int = Field(5, ge=0, description="trials that finish before the median pruner stops any")
    prune_warmup: int = Field(1, ge=0, description="validations (epochs, by default) of a trial never pruned")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and (not v or set(v) - set(MONITOR_METRICS)):
            raise ValueError(f"metric weights must be among {list(MONITOR_METRICS)}, got {sorted(v)}")
        return v


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    label: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of the experiment's training "
        "config for this model only, e.g. {hist_len: 50} in a history-length sweep",
    )
    tune: ModelTune | None = Field(
        None,
        description="`sampletok tune` only: {space: {key: {kind, ...} or null}, only: [keys]} overrides, drops "
        "or restricts the search space the model declares",
    )

    @property
    def display(self) -> str:
        return self.label or self.name

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """The experiment's training config with this model's overrides (validated like the base)."""
        if not self.train:
            return base
        try:
            return TrainConfig.model_validate({**base.model_dump(), **self.train})
        except ValidationError as e:
            raise ConfigError(f"model {self.display}: invalid train override: {_errors(e)}") from None


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "experiment"
    dataset: DatasetConfig
    train: TrainConfig = TrainConfig()
    seeds: list[int] = Field([2021, 2022, 2023], min_length=1)
    models: list[ModelSpec] = Field(min_length=1)
    reference: str | None = Field(None, description="label of the model every other is t-tested against")
    requests: dict[str, list] | None = Field(
        None,
        description="train/evaluate only on request rows whose "
        "fields take these values, e.g. {domain: [1]}; history is unfiltered",
    )
    tune: TuneConfig = Field(
        default_factory=TuneConfig, description="`sampletok tune` only: trials per model, metric, sampler"
    )

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> Experiment:
        data = load_yaml_mapping(path, "experiment", "name, dataset, models, ...", ConfigError)
        data.update(overrides or {})
        exp = validated(cls, data, f"{path}: invalid experiment")
        labels = [m.display for m in exp.models]
        if exp.reference is not None and exp.reference not in labels:
            raise ConfigError(f"{path}: reference '{exp.reference}' is not a model label ({', '.join(labels)})")
        return exp


def load_dataset(cfg: DatasetConfig, progress: bool = True) -> PreparedDataset:
    """Prepare (or reuse) the dataset an experiment names."""
    from sampletok.data.sources import FileSource, RawSource
    from sampletok.data.sources.movielens import load_movielens
    from sampletok.data.sources.synthetic import SyntheticConfig, generate_source
    from sampletok.schema import Schema

    if cfg.kind != "synthetic" and not cfg.path:
        raise ConfigError(f"dataset.path: needed for dataset kind '{cfg.kind}'")
    path = cfg.path or ""
    source: RawSource
    if cfg.kind == "prepared":
        return PreparedDataset(path)
    if cfg.kind == "movielens":
        source, schema = load_movielens(path)
        default_dir = f"runs/prepared/{schema.name}"
    elif cfg.kind == "kuairand":
        from sampletok.data.sources.kuairand import load_kuairand

        source, schema = load_kuairand(path)
        default_dir = f"runs/prepared/{schema.name}"
    elif cfg.kind == "files":
        if not cfg.schema_path:
            raise ConfigError("dataset kind 'files' needs schema_path")
        schema = Schema.from_yaml(cfg.schema_path)
        source = FileSource(path)
        default_dir = f"runs/prepared/{schema.name}"
    else:
        syn = validated(SyntheticConfig, cfg.synthetic, prefix="dataset.synthetic.")
        source, schema = generate_source(syn)
        default_dir = f"runs/prepared/synthetic-{syn.fingerprint()}"
    return prepare(source, schema, cfg.prepared_dir or default_dir, cfg.split, progress=progress)


def run_fingerprint(
    ds: PreparedDataset,
    spec: ModelSpec,
    train_cfg: TrainConfig,
    seed: int,
    requests: dict[str, list] | None = None,
    producer: str | None = None,
) -> dict:
    """What makes a run this run: a checkpoint is resumed only under the same fingerprint (including the
    producer of the token store the model reads, so re-exported tokens never resume an old checkpoint)."""
    return {
        "model": spec.name,
        "producer": producer,
        "params": json.loads(json.dumps(spec.params, default=str)),
        # history_buckets is evaluation only; fields added later compare at their default (same_fingerprint)
        "train": train_cfg.model_dump(mode="json", exclude={"history_buckets"}),
        "dataset": ds.fingerprint,
        "seed": seed,
        "requests": requests,
    }


def metrics_by_history(
    index, ds: PreparedDataset, rows: np.ndarray, p: np.ndarray, y: np.ndarray, u: np.ndarray, cfg: TrainConfig
) -> dict[str, dict[str, float]]:
    """Test metrics per bucket of the requests' number of past events (``TrainConfig.history_buckets``), each
    with its row count ``n``: both papers report gains that grow with the history a user has."""
    past = index.count_before(np.asarray(ds.col(USER_KEY))[rows], np.asarray(ds.col(TIMESTAMP))[rows])
    bucket = np.searchsorted(np.asarray(cfg.history_buckets, np.int64), past, side="right")
    out: dict[str, dict[str, float]] = {}
    for k, label in enumerate(cfg.history_bucket_labels()):
        m = bucket == k
        out[label] = {**all_metrics(y[m], p[m], u[m]), "n": int(m.sum())} if m.any() else {"n": 0.0}
    return out


def run_model(
    ds: PreparedDataset,
    spec: ModelSpec,
    train_cfg: TrainConfig,
    seed: int,
    run_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = True,
    requests: dict[str, list] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    on_mismatch: Literal["error", "restart"] = "error",
    on_validation: Callable[[int, float], None] | None = None,
    evaluate_test: bool = True,
) -> dict:
    """Train one model with one seed and return its validation/test metrics and speed. A checkpoint in
    ``run_dir`` is resumed only if it was written by the same run (else a one-line error, or a fresh start
    with ``on_mismatch="restart"``); ``resume=False`` trains afresh and first removes the folder's old
    checkpoint, model and result, so a crash cannot leave another run's model beside the new checkpoint.

    ``evaluate_test=False`` (hyper-parameter search, :mod:`sampletok.train.tune`) never selects the test
    split's rows: the result holds the validation figures only, and no model or result file is written.
    ``on_validation(step, score)`` is :func:`~sampletok.train.trainer.fit`'s per-validation monitor hook."""
    if run_dir is not None and not resume and distributed.is_main():
        for name in ("checkpoint.pt", "model.pt", "result.json"):
            (Path(run_dir) / name).unlink(missing_ok=True)
    distributed.barrier()
    set_seed(seed)
    layout = FeatureLayout.from_dataset(ds)
    model = build_model(spec.name, layout, **spec.params)
    index = history_index(ds)
    hist_len = resolved_hist_len(ds, train_cfg.hist_len)
    # the tokenizer step (IAT: train + export the source model's tokens, cached; SIF with a store: open it)
    tokens = open_tokens(model, ds, seed=seed, hist_len=hist_len, progress=progress)
    producer = tokens.producer if tokens is not None else None

    def mk(request_rows: np.ndarray, batch_size: int, shuffle: bool) -> BatchLoader:
        # one loader type for train/valid/test; only the training loader shuffles and replaces by OOV
        return BatchLoader(
            ds,
            request_rows,
            batch_size,
            hist_len=hist_len,
            shuffle=shuffle,
            seed=seed,
            index=index,
            layout=layout,
            oov_rate=train_cfg.oov_rate if shuffle else 0.0,
            history_samples=model.reads_history_samples,
            tokens=tokens,
        )

    def rows(split: str, seen: bool = False) -> np.ndarray:
        return ds.rows(split, seen_users_only=seen, where=requests)

    train_loader = mk(recent_rows(rows("train"), train_cfg.train_recent_fraction), train_cfg.batch_size, True)
    valid_loader = mk(rows("valid"), train_cfg.eval_batch_size, False)
    t0 = time.time()
    result = fit(
        model,
        train_loader,
        valid_loader,
        train_cfg,
        seed,
        run_dir=run_dir,
        resume=resume,
        progress=progress,
        fingerprint=run_fingerprint(ds, spec, train_cfg, seed, requests, producer),
        on_epoch_end=on_epoch_end,
        on_mismatch=on_mismatch,
        on_validation=on_validation,
    )
    wall = time.time() - t0
    calibration = fit_calibration(model, valid_loader) if train_cfg.calibrate else None
    out: dict[str, Any] = {
        "model": spec.display,
        "name": spec.name,
        "params": spec.params,
        "seed": seed,
        "valid": result.best_valid,
        "best_epoch": result.best_epoch,
        "epochs": result.history[-1]["epoch"] if result.history else 0,  # trained, fractional if stopped inside one
        "history": result.history,
        "stopped": result.stopped,
        "monitor": train_cfg.monitor,
        "calibration": calibration,
        "train_samples_per_s": result.train_samples_per_s,
        "fit_wall_s": wall,
        "train": train_cfg.model_dump(mode="json"),
    }
    if tokens is not None and tokens.store.meta.get("source_valid"):  # an IAT source model's own quality
        out["source_valid"] = tokens.store.meta["source_valid"]
    if not evaluate_test:  # the search phase of a tune: validation only, the test rows are never selected
        return out
    test_rows, seen_rows = rows("test"), rows("test", True)
    t_inf = time.time()
    p, y, u = predict(model, mk(test_rows, train_cfg.eval_batch_size, False))
    infer_sps = len(test_rows) / max(time.time() - t_inf, 1e-9)
    test = all_metrics(y, p, u)
    by_history = metrics_by_history(index, ds, test_rows, p, y, u, train_cfg)
    # every test user seen in training (always on synthetic logs): the same rows, not scored twice
    seen = (
        test
        if np.array_equal(seen_rows, test_rows)
        else evaluate(model, mk(seen_rows, train_cfg.eval_batch_size, False))
    )
    out.update(
        test=test,
        test_seen_users=seen,
        test_by_history=by_history,
        producer=producer,
        infer_samples_per_s=infer_sps,
        n_params=int(sum(p.numel() for p in model.parameters())),  # frozen tables count too
        dataset=ds.fingerprint,
        torch_threads=torch.get_num_threads(),
        world_size=distributed.world_size(),
        requests=requests,
    )
    if run_dir and distributed.is_main():
        # the producer of the tokens/codes the model was trained on: scoring with another store is refused
        save_torch(
            {
                "config": model_config(spec.name, spec.params),  # every argument, defaults included
                "state_dict": model.state_dict(),
                "dataset": ds.fingerprint,
                "hist_len": hist_len,
                "seed": seed,
                "producer": producer,
            },
            Path(run_dir) / "model.pt",
        )
        save_json(out, Path(run_dir) / "result.json")
    distributed.barrier()
    return out


def recent_rows(rows: np.ndarray, fraction: float | None) -> np.ndarray:
    """The latest ``fraction`` of time-ordered ``rows`` (as :meth:`PreparedDataset.rows` returns them); all of
    them when ``fraction`` is None."""
    if fraction is None:
        return rows
    return rows[len(rows) - int(np.ceil(fraction * len(rows))) :]


@dataclass
class TrainedRun:
    """A model saved by :func:`run_model`, ready to score: the model, its history length and the token source
    it was trained with (None for models that read no store)."""

    model: RankingModel
    hist_len: int
    tokens: TokenSource | None

    def loader(self, ds: PreparedDataset, rows: np.ndarray, batch_size: int = 4096) -> BatchLoader:
        """The loader that feeds this model exactly what it was trained on (history, samples, tokens)."""
        return BatchLoader(
            ds,
            rows,
            batch_size,
            hist_len=self.hist_len,
            history_samples=self.model.reads_history_samples,
            tokens=self.tokens,
        )


def load_trained(ds: PreparedDataset, run_dir: str | Path) -> TrainedRun:
    """A model saved by :func:`run_model`, refused if it was trained on another dataset or would read tokens of
    another producer than it was trained with."""
    path = Path(run_dir) / "model.pt"
    saved = load_torch_dict(
        path, {"state_dict", "dataset"}, "model saved by `sampletok train`", "train a model there first"
    )
    if "config" not in saved:
        raise ConfigError(
            f"{path}: saved by an older sampletok, without the model's config; train the model again "
            "(`sampletok train`, or `compare` for an experiment)"
        )
    if saved["dataset"] != ds.fingerprint:
        raise ConfigError(f"{path}: trained on dataset {saved['dataset']}, not {ds.fingerprint}")
    config = saved["config"]
    model = build_model(config["name"], FeatureLayout.from_dataset(ds), **config["params"])
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as e:
        raise ConfigError(
            f"{path}: weights do not fit the model {config['name']} of this version "
            f"({one_line(e)[:200]}); train the model again"
        ) from None
    hist_len = resolved_hist_len(ds, saved["hist_len"])
    # the training seed finds the same cached store; build=False: never train a new source model here
    tokens = open_tokens(model, ds, seed=saved.get("seed", 0), hist_len=hist_len, progress=False, build=False)
    got, want = (tokens.producer if tokens is not None else None), saved.get("producer")
    if got != want:
        raise StoreError(
            f"{path}: the model was trained with tokens of producer {want}, but the store it would "
            f"read now was written by {got}; evaluate with the store it was trained with"
        )
    return TrainedRun(model, hist_len, tokens)


def compare(
    exp: Experiment, out_dir: str | Path, progress: bool = True, ds: PreparedDataset | None = None
) -> list[dict]:
    """Every model × seed of an experiment on one prepared dataset; writes results.json, results.md, plots.
    Finished (model, seed) runs found in ``out_dir`` are reused, so an interrupted compare resumes."""
    from rich.console import Console

    from sampletok.report.tables import write_report

    console = Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [m.display for m in exp.models]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"model labels must be unique, got {labels}")
    train_cfgs = {spec.display: spec.train_config(exp.train) for spec in exp.models}  # bad overrides fail now
    if ds is None:  # under torchrun rank 0 prepares, the others then open what it wrote
        if not distributed.is_main():
            distributed.barrier()
        ds = load_dataset(exp.dataset, progress=progress)
        if distributed.is_main():
            distributed.barrier()
    ds.load_into_memory(max_rows=IN_MEMORY_MAX_ROWS)
    runs = []
    for spec in exp.models:
        for seed in exp.seeds:
            run_dir = out_dir / "runs" / run_folder_name(spec.display) / str(seed)
            done = run_dir / "result.json"
            # a run folder linked in from another experiment (to pair with its runs) is reused, never replaced
            linked = not run_dir.resolve().is_relative_to(out_dir.resolve())
            distributed.barrier()  # every rank decides on the same files: reuse or train, together
            if done.exists():
                cached = json.loads(done.read_text())
                if _same_run(cached, spec, train_cfgs[spec.display], exp, ds):
                    runs.append(cached)
                    continue
                if linked:
                    raise ConfigError(
                        f"{run_dir}: linked to {run_dir.resolve()}, whose run was made with another configuration "
                        f"than model '{spec.display}' here; make the two configurations equal or remove the link"
                    )
                console.print(
                    f"[yellow]{run_dir}: finished with another configuration, training again[/]", soft_wrap=True
                )
                distributed.barrier()
                if distributed.is_main():
                    for stale in run_dir.iterdir():  # a stale checkpoint must not be resumed either
                        stale.unlink() if stale.is_file() else None
                distributed.barrier()
            # compare owns its run folders: an interrupted run of another configuration is started afresh
            r = run_model(
                ds,
                spec,
                train_cfgs[spec.display],
                seed,
                run_dir=run_dir,
                progress=progress,
                requests=exp.requests,
                on_mismatch="error" if linked else "restart",
            )
            if distributed.is_main():
                console.print(
                    f"[bold]{spec.display}[/] seed {seed}: test AUC {r['test']['auc']:.4f} "
                    f"GAUC {r['test']['gauc']:.4f} LogLoss {r['test']['logloss']:.4f} "
                    f"({r['train_samples_per_s']:.0f} samples/s, best epoch {r['best_epoch']})"
                )
            runs.append(r)
    if not distributed.is_main():
        return runs
    save_json(
        {"experiment": exp.model_dump(mode="json"), "dataset": ds.manifest["source"], "runs": runs},
        out_dir / "results.json",
    )
    table = write_report(runs, out_dir, reference=exp.reference or labels[0], title=exp.name)
    console.print(table)
    return runs


def _same_run(cached: dict, spec: ModelSpec, train: TrainConfig, exp: Experiment, ds: PreparedDataset) -> bool:
    """Whether a finished run was made by this model, parameters, dataset, training config and request filter
    (runs written before ``train``/``requests`` were recorded are matched on the rest). Runs made before the
    correctness round (no ``monitor`` recorded: AUC-only stopping, in-sample IAT tokens under the same
    parameters) are never reused."""
    same = (
        "monitor" in cached
        and cached.get("name") == spec.name
        and cached.get("params") == spec.params
        and cached.get("dataset") == ds.fingerprint
    )
    if "train" in cached:  # validated, so a field added since the run was made compares at its default
        same &= TrainConfig.model_validate(cached["train"]) == train
    if "requests" in cached:
        same &= cached["requests"] == exp.requests
    return same


def run_folder_name(s: str) -> str:
    """The folder of a model label's runs under ``OUT/runs/`` (``+`` and other signs become ``_``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
