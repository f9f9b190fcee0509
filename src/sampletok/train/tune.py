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
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from sampletok.errors import ConfigError, SampletokError, validation_message

if TYPE_CHECKING:
    from sampletok.data.dataset import PreparedDataset
    from sampletok.train.experiment import Experiment, ModelSpec


from sampletok.search_space import (  # noqa: F401 (re-exported: the tune module's public names)
    _SPACE,
    TRAIN_SPACE,
    CategoricalSpace,
    FloatSpace,
    IntSpace,
    Space,
    _check_bounds,
    _space_field,
    _space_message,
    checked_space,
    choice,
    integer,
    log_uniform,
    uniform,
)


# ------------------------------------------------------------------ the experiment's tune sections
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
    from sampletok.train.trainer import _fingerprint_diff, monitor_score, same_fingerprint

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
    elif not same_fingerprint(old, fingerprint):
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
            "tune": _tune_config(),
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


def _tune_config():
    from sampletok.train.experiment import TuneConfig

    return TuneConfig()
