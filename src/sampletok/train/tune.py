"""Equal-budget hyper-parameter tuning (the BARS/FuxiCTR habit): every model of an experiment gets the same
number of Optuna trials over the search space it declares beside its parameters (``search_space``), each trial
trained with the experiment's first seed and scored on the **validation split only**; the best configuration
of each model is then rerun with every seed by :func:`~sampletok.train.experiment.compare`, whose test figures
are the tuned rows.

A space is a mapping ``key -> Space``: a key that is a :class:`~sampletok.train.trainer.TrainConfig` field
(``lr``, ``weight_decay``, ...) goes to the model's train override, any other key names a model parameter, a
dotted one a field of a sub-config (``hgaq.codes``). A model's params or train override that fix a key
remove it from the declared space; an experiment's ``tune: {space: ...}`` on a model spec overrides or adds
dimensions (``null`` drops one) and ``tune: {only: [...]}`` restricts it.

The study of each model lives in ``OUT/tune/<label>.db`` (SQLite): an interrupted tune resumes, and since
trial k is sampled with the seed ``seed + k`` from the trials before it, it ends with the same trials as one
run in one go.

Example:
    >>> space = {"lr": log_uniform(1e-4, 1e-2), "dropout": uniform(0.0, 0.5), "blocks": integer(1, 4)}
    >>> space["lr"].kind, space["blocks"].high
    ('float', 4)
    >>> checked_space({"width": {"kind": "categorical", "choices": [16, 32]}})["width"].choices
    [16, 32]
    >>> checked_space({"lr": {"kind": "float", "low": 1e-2, "high": 1e-4}})
    Traceback (most recent call last):
    ...
    sampletok.errors.ConfigError: tune space: lr: low 0.01 is above high 0.0001
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from sampletok.errors import ConfigError, SampletokError, validation_message

if TYPE_CHECKING:
    from sampletok.data.dataset import PreparedDataset
    from sampletok.train.experiment import Experiment, ModelSpec


# ------------------------------------------------------------------ the description of a space
class FloatSpace(BaseModel):
    """A float in [low, high]; ``log``: sampled log-uniformly (low > 0)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatSpace:
        _check_bounds(self.low, self.high, self.log)
        return self

    def corners(self) -> list[Any]:
        return [self.low, self.high]


class IntSpace(BaseModel):
    """An integer in [low, high] by ``step``; ``log``: sampled log-uniformly (low >= 1, step 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["int"] = "int"
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntSpace:
        _check_bounds(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("a log-scaled int space takes step 1")
        return self

    def corners(self) -> list[Any]:
        return [self.low, self.high]


class CategoricalSpace(BaseModel):
    """One of ``choices`` (numbers, strings, booleans, or JSON values such as lists of MLP widths)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["categorical"] = "categorical"
    choices: list[Any] = Field(min_length=1)

    @field_validator("choices")
    @classmethod
    def _distinct(cls, v: list[Any]) -> list[Any]:
        encoded = [json.dumps(c, sort_keys=True) for c in v]
        if len(set(encoded)) != len(encoded):
            raise ValueError(f"choices must be distinct, got {v}")
        return v

    def corners(self) -> list[Any]:
        return list(self.choices)


Space = Annotated[FloatSpace | IntSpace | CategoricalSpace, Field(discriminator="kind")]
_SPACE: TypeAdapter[dict[str, Space]] = TypeAdapter(dict[str, Space])


def _check_bounds(low: float, high: float, log: bool) -> None:
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"low and high must be finite, got {low}, {high}")
    if low > high:
        raise ValueError(f"low {low} is above high {high}")
    if log and low <= 0:
        raise ValueError(f"a log-scaled space needs low > 0, got {low}")


def uniform(low: float, high: float) -> FloatSpace:
    return FloatSpace(low=low, high=high)


def log_uniform(low: float, high: float) -> FloatSpace:
    return FloatSpace(low=low, high=high, log=True)


def integer(low: int, high: int, step: int = 1) -> IntSpace:
    return IntSpace(low=low, high=high, step=step)


def choice(*choices: Any) -> CategoricalSpace:
    return CategoricalSpace(choices=list(choices))


def checked_space(data: Any, where: str = "tune space") -> dict[str, Space]:
    """A space from plain data (YAML), a bad one a one-line :class:`ConfigError` naming the key."""
    try:
        return _SPACE.validate_python(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {_space_message(e)}") from None


def _space_message(e: ValidationError) -> str:
    """``key: message`` (pydantic's location of a tagged union, ``key.float.low``, without its tag)."""
    parts = []
    for er in e.errors():
        loc = [str(x) for x in er["loc"] if x not in ("float", "int", "categorical")]
        msg = er["msg"].removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(" ".join(p.split()) for p in parts)


def _space_field(v: Any) -> dict[str, Any]:
    """Validator of a ``space`` field in a config (None values kept: they drop a declared dimension)."""
    if not isinstance(v, dict):
        raise ValueError(f"a space is a mapping of key -> {{kind, ...}}, got {type(v).__name__}")
    try:
        checked = _SPACE.validate_python({k: s for k, s in v.items() if s is not None})
    except ValidationError as e:
        raise ValueError(_space_message(e)) from None
    return {k: (checked[k] if k in checked else None) for k in v}


# The training settings every model searches: Adam's learning rate (log-uniform) and its L2 weight decay, the
# embedding regularization of FuxiCTR's spaces (log-uniform; 1e-8 is as good as none).
TRAIN_SPACE: dict[str, Space] = {"lr": log_uniform(1e-4, 1e-2), "weight_decay": log_uniform(1e-8, 1e-4)}


# ------------------------------------------------------------------ the experiment's tune sections
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
    prune_warmup: int = Field(1, ge=0, description="epochs of a trial never pruned")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        from sampletok.train.trainer import MONITOR_METRICS

        if v is not None and (not v or set(v) - set(MONITOR_METRICS)):
            raise ValueError(f"metric weights must be among {list(MONITOR_METRICS)}, got {sorted(v)}")
        return v


# ------------------------------------------------------------------ a model's space
def _train_keys() -> set[str]:
    from sampletok.train.trainer import TrainConfig

    return set(TrainConfig.model_fields)


def _flat_keys(params: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for k, v in params.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _flat_keys(v, f"{prefix}{k}.")
    return out


def declared_space(name: str) -> dict[str, Space]:
    """The search space the model registered as ``name`` declares (its class's ``search_space``)."""
    from sampletok.models import MODELS

    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; available: {', '.join(sorted(MODELS))}")
    return dict(MODELS[name].search_space)


def model_space(spec: ModelSpec, base_train: dict[str, Any] | None = None) -> dict[str, Space]:
    """The space one model spec is searched over: the declared space less the keys its params or train
    override fix, with its ``tune`` section applied; every key checked against the model (see
    :func:`check_space`)."""
    space = declared_space(spec.name)
    fixed = _flat_keys(spec.params) | set(spec.train)
    space = {k: v for k, v in space.items() if k not in fixed}
    if spec.tune is not None:
        for k, v in spec.tune.space.items():
            if v is None:
                space.pop(k, None)
            else:
                space[k] = v
        if spec.tune.only is not None:
            missing = [k for k in spec.tune.only if k not in space]
            if missing:
                raise ConfigError(
                    f"model {spec.display}: tune.only: {', '.join(missing)} not in its space "
                    f"({', '.join(space) or 'empty'})"
                )
            space = {k: space[k] for k in spec.tune.only}
    if not space:
        raise ConfigError(f"model {spec.display}: empty search space (every key fixed or dropped): nothing to tune")
    check_space(spec, space, base_train)
    return space


def check_space(spec: ModelSpec, space: dict[str, Space], base_train: dict[str, Any] | None = None) -> None:
    """Every key of ``space`` is a training setting or an existing (sub-)parameter of the model, and each end
    of its range (each choice) is a value the training config or the model accepts: a one-line ConfigError."""
    from sampletok.models.base import model_config
    from sampletok.train.trainer import TrainConfig

    where = f"model {spec.display}: tune space"
    train_keys = _train_keys()
    full = model_config(spec.name, spec.params)["params"]
    for key, s in space.items():
        if key in train_keys:
            for v in s.corners():
                try:
                    TrainConfig.model_validate({**(base_train or {}), **spec.train, key: v})
                except ValidationError as e:
                    raise ConfigError(f"{where}: {validation_message(e)}") from None
            continue
        node: Any = full
        for i, part in enumerate(key.split(".")):
            if not isinstance(node, dict) or part not in node:
                what = "parameter" if i == 0 else f"field of {'.'.join(key.split('.')[:i])}"
                known = sorted(node) if isinstance(node, dict) else []
                raise ConfigError(
                    f"{where}: unknown {what} '{key}' (model {spec.name} takes {', '.join(known) or 'no sub-fields'}"
                    f"{'; train settings: lr, weight_decay, ...' if i == 0 else ''})"
                )
            node = node[part]
        for v in s.corners():
            try:
                model_config(spec.name, with_values(spec.params, {key: v}))
            except ConfigError as e:
                raise ConfigError(f"{where}: {key} = {v!r}: {str(e).removeprefix(f'model {spec.name!r}: ')}") from None


def with_values(params: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``params`` with sampled ``values`` set (a dotted key into its sub-config), a deep copy.

    Example:
        >>> with_values({"width": 16, "hgaq": {"levels": 2}}, {"hgaq.codes": 64, "blocks": 2})
        {'width': 16, 'hgaq': {'levels': 2, 'codes': 64}, 'blocks': 2}
    """
    out = copy.deepcopy(params)
    for key, v in values.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"tune: {key}: {part} is not a sub-config")
        node[last] = v
    return out


def tuned_spec(spec: ModelSpec, values: dict[str, Any]) -> ModelSpec:
    """The spec with sampled ``values``: training settings into its train override, the rest into params."""
    train_keys = _train_keys()
    train = {**spec.train, **{k: v for k, v in values.items() if k in train_keys}}
    params = with_values(spec.params, {k: v for k, v in values.items() if k not in train_keys})
    return spec.model_copy(update={"params": params, "train": train, "tune": None})


# ------------------------------------------------------------------ the search
def _optuna():
    try:
        import optuna
    except ImportError:
        raise SampletokError("tuning needs the tune extra: pip install 'sampletok[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _suggest(trial, key: str, s: Space) -> Any:
    if isinstance(s, FloatSpace):
        return trial.suggest_float(key, s.low, s.high, log=s.log)
    if isinstance(s, IntSpace):
        return trial.suggest_int(key, s.low, s.high, step=s.step, log=s.log)
    if all(c is None or isinstance(c, (bool, int, float, str)) for c in s.choices):
        return trial.suggest_categorical(key, s.choices)
    # lists (MLP widths) are not Optuna choices: stored as their JSON text
    return json.loads(trial.suggest_categorical(key, [json.dumps(c) for c in s.choices]))


def study_path(out_dir: str | Path, label: str) -> Path:
    """The SQLite file of a model's study: ``OUT/tune/<label>.db``."""
    from sampletok.train.experiment import run_folder_name

    return Path(out_dir) / "tune" / f"{run_folder_name(label)}.db"


def _monitor(exp: Experiment) -> dict[str, float]:
    return exp.tune.metric if exp.tune.metric is not None else exp.train.monitor


def search_model(
    ds: PreparedDataset, exp: Experiment, spec: ModelSpec, out_dir: str | Path, progress: bool = True
) -> dict[str, Any]:
    """Run the missing trials of one model's study (``exp.tune.trials`` in all, interrupted ones again) on the
    validation split, and return its best trial among the first ``trials``: {label, trials, counts, best
    trial number, validation score, chosen values, the tuned spec}."""
    from tqdm.auto import tqdm

    from sampletok.train.experiment import run_model
    from sampletok.train.trainer import _fingerprint_diff, monitor_score

    optuna = _optuna()
    from optuna.trial import TrialState

    cfg = exp.tune
    monitor = _monitor(exp)
    base_train = {**exp.train.model_dump(), "monitor": monitor}
    space = model_space(spec, base_train)
    seed = exp.seeds[0]
    db = study_path(out_dir, spec.display)
    db.parent.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{db.resolve()}"
    fingerprint = json.loads(
        json.dumps(
            {
                "model": spec.name,
                "params": spec.params,
                "train": {**base_train, **spec.train},
                "space": {k: v.model_dump() for k, v in space.items()},
                "dataset": ds.fingerprint,
                "seed": seed,
                "requests": exp.requests,
                "sampler": cfg.model_dump(exclude={"trials"}),
            },
            default=str,
        )
    )
    study = optuna.create_study(study_name=spec.display, storage=storage, direction="maximize", load_if_exists=True)
    old = study.user_attrs.get("fingerprint")
    if old is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif old != fingerprint:
        raise ConfigError(
            f"{db}: a study of another configuration ({_fingerprint_diff(old, fingerprint)}); "
            "pass --restart to tune afresh or choose another --out"
        )
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)  # left running by an interrupted tune: run again

    def counted() -> list:
        # an interrupted trial (FAIL without an error of its own) does not count: it is run again
        return [
            t
            for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and "error" in t.user_attrs)
        ]

    done = counted()
    bar = tqdm(
        total=cfg.trials,
        initial=min(len(done), cfg.trials),
        desc=f"tune {spec.display}",
        disable=None if progress else True,
    )
    while len(done) < cfg.trials:
        # trial k: sampled with seed + k from the trials before it, so a resumed study samples what one
        # uninterrupted run would have
        sampler = optuna.samplers.TPESampler(seed=cfg.seed + len(done), n_startup_trials=cfg.startup_trials)
        pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=cfg.prune_startup, n_warmup_steps=cfg.prune_warmup)
            if cfg.pruner == "median"
            else optuna.pruners.NopPruner()
        )
        study = optuna.load_study(study_name=spec.display, storage=storage, sampler=sampler, pruner=pruner)
        trial = study.ask()
        values = {k: _suggest(trial, k, s) for k, s in space.items()}
        trial.set_user_attr("values", values)
        candidate = tuned_spec(spec, values)

        def report(epoch: int, score: float, trial=trial) -> None:
            if math.isfinite(score):
                trial.report(score, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        try:
            r = run_model(
                ds,
                candidate,
                candidate.train_config(exp.train.model_copy(update={"monitor": monitor})),
                seed,
                run_dir=None,
                progress=False,
                requests=exp.requests,
                on_validation=report,
                evaluate_test=False,  # the search reads the validation split only
            )
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except SampletokError as e:  # e.g. no finite validation score, or heads that do not divide a width
            trial.set_user_attr("error", " ".join(str(e).split())[:500])
            study.tell(trial, state=TrialState.FAIL)
        except BaseException:  # interrupted: this trial is run again on resume
            study.tell(trial, state=TrialState.FAIL)
            raise
        else:
            value = monitor_score(r["valid"], monitor)
            trial.set_user_attr("valid", r["valid"])
            trial.set_user_attr("best_epoch", r["best_epoch"])
            if math.isfinite(value):
                study.tell(trial, value)
            else:
                trial.set_user_attr("error", f"validation score {value}")
                study.tell(trial, state=TrialState.FAIL)
        done = counted()
        bar.update(1)
        finished = [t for t in done if t.state == TrialState.COMPLETE]
        if finished:
            bar.set_postfix(best=f"{max(t.value for t in finished):.4f}")
    bar.close()
    budget = done[: cfg.trials]  # a study run with more trials before: the first `trials` decide
    states = [t.state for t in budget]
    finished = [t for t in budget if t.state == TrialState.COMPLETE]
    if not finished:
        errors = [t.user_attrs.get("error") for t in budget if t.user_attrs.get("error")]
        raise ConfigError(
            f"model {spec.display}: none of its {cfg.trials} trials finished"
            + (f" (last error: {errors[-1]})" if errors else " (all pruned)")
        )
    best = max(finished, key=lambda t: (t.value, -t.number))
    return {
        "model": spec.display,
        "name": spec.name,
        "trials": cfg.trials,
        "complete": states.count(TrialState.COMPLETE),
        "pruned": states.count(TrialState.PRUNED),
        "failed": states.count(TrialState.FAIL),
        "best_trial": best.number,
        "valid_score": best.value,
        "valid": best.user_attrs.get("valid"),
        "best_epoch": best.user_attrs.get("best_epoch"),
        "values": best.user_attrs["values"],
        "space": {k: v.model_dump() for k, v in space.items()},
        "study": str(db),
        "spec": tuned_spec(spec, best.user_attrs["values"]).model_dump(mode="json", exclude={"tune"}),
    }


def search(
    exp: Experiment, out_dir: str | Path, progress: bool = True, ds: PreparedDataset | None = None
) -> list[dict[str, Any]]:
    """The search phase of :func:`tune`: every model's study, validation split only (the test split is never
    selected). Every model's space is checked before any trial runs."""
    from sampletok.data.dataset import IN_MEMORY_MAX_ROWS
    from sampletok.train.experiment import load_dataset

    labels = [m.display for m in exp.models]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"model labels must be unique, got {labels}")
    base_train = {**exp.train.model_dump(), "monitor": _monitor(exp)}
    for spec in exp.models:  # a bad space fails before any training
        model_space(spec, base_train)
    _optuna()
    if ds is None:
        ds = load_dataset(exp.dataset, progress=progress)
    ds.load_into_memory(max_rows=IN_MEMORY_MAX_ROWS)
    return [search_model(ds, exp, spec, out_dir, progress) for spec in exp.models]


def tuned_experiment(exp: Experiment, chosen: list[dict[str, Any]]) -> Experiment:
    """The experiment of the tuned models (the chosen values in each spec), which ``sampletok compare`` reruns."""
    from sampletok.train.experiment import ModelSpec

    train = exp.train if exp.tune.metric is None else exp.train.model_copy(update={"monitor": exp.tune.metric})
    return exp.model_copy(
        update={
            "name": f"{exp.name}-tuned",
            "train": train,
            "models": [ModelSpec.model_validate(c["spec"]) for c in chosen],
            "tune": TuneConfig(),
        }
    )


def tune(
    exp: Experiment, out_dir: str | Path, progress: bool = True, ds: PreparedDataset | None = None
) -> dict[str, Any]:
    """Search every model's space with the same budget on the validation split, then rerun each model's best
    configuration with every seed of the experiment. Writes under ``OUT/tune/``: the studies (``<label>.db``),
    ``tuned.json`` (budget, chosen values, best validation scores, test means), ``tuned.yaml`` (the tuned
    experiment) and ``report.md``; the reruns (``compare``) write ``OUT/tune/tuned/``."""
    import yaml
    from rich.console import Console
    from rich.table import Table

    from sampletok.atomic import save_json
    from sampletok.report.tables import markdown_table
    from sampletok.train.experiment import compare, load_dataset

    console = Console()
    out_dir = Path(out_dir)
    for spec in exp.models:  # a bad space or train override fails before the dataset is prepared
        spec.train_config(exp.train)
        model_space(spec, {**exp.train.model_dump(), "monitor": _monitor(exp)})
    _optuna()
    ds = ds if ds is not None else load_dataset(exp.dataset, progress=progress)
    chosen = search(exp, out_dir, progress, ds=ds)
    table = Table(title=f"{exp.name}: {exp.tune.trials} trials per model, validation split only")
    for h in ("model", "complete/pruned/failed", "best trial", "valid score", "chosen values"):
        table.add_column(h, justify="left" if h in ("model", "chosen values") else "right")
    for c in chosen:
        table.add_row(
            c["model"],
            f"{c['complete']}/{c['pruned']}/{c['failed']}",
            str(c["best_trial"]),
            f"{c['valid_score']:.4f}",
            _values_text(c["values"]),
        )
    console.print(table)
    tuned = tuned_experiment(exp, chosen)
    tune_dir = out_dir / "tune"
    tune_dir.mkdir(parents=True, exist_ok=True)
    (tune_dir / "tuned.yaml").write_text(
        yaml.safe_dump(tuned.model_dump(mode="json", exclude={"tune"}), sort_keys=False)
    )
    runs = compare(tuned, tune_dir / "tuned", progress=progress, ds=ds)
    reference = tuned.reference or tuned.models[0].display
    for c in chosen:
        mine = [r["test"] for r in runs if r["model"] == c["model"]]
        c["test_mean"] = {k: sum(t[k] for t in mine) / len(mine) for k in ("auc", "gauc", "logloss")}
    summary = {
        "experiment": exp.name,
        "trials_per_model": exp.tune.trials,
        "metric": _monitor(exp),
        "search_seed": exp.seeds[0],
        "seeds": exp.seeds,
        "tune": exp.tune.model_dump(mode="json"),
        "models": chosen,
    }
    save_json(summary, tune_dir / "tuned.json")
    lines = [
        f"# {exp.name}: tuned",
        "",
        f"Budget: {exp.tune.trials} trials per model (TPE seed {exp.tune.seed}, pruner {exp.tune.pruner}), each "
        f"trained with seed {exp.seeds[0]} and scored on the validation split only (metric {_monitor(exp)}); "
        f"the best configuration of each model rerun with seeds {exp.seeds}.",
        "",
        "| model | trials | complete/pruned/failed | best trial | valid score | chosen values |",
        "|---|---|---|---|---|---|",
    ]
    for c in chosen:
        lines.append(
            f"| {c['model']} | {c['trials']} | {c['complete']}/{c['pruned']}/{c['failed']} | {c['best_trial']} "
            f"| {c['valid_score']:.4f} | {_values_text(c['values'])} |"
        )
    lines += ["", "Test figures of the tuned models:", "", markdown_table(runs, reference), ""]
    (tune_dir / "report.md").write_text("\n".join(lines))
    console.print(f"→ {tune_dir / 'report.md'}, {tune_dir / 'tuned.json'}, {tune_dir / 'tuned.yaml'}")
    return summary


def _values_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={json.dumps(v)}" for k, v in values.items())
