"""The ``sampletok`` command line. Errors meant for the user are printed as one line (exit code 2)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal, cast

import numpy as np
import typer
import yaml
from rich.console import Console

from sampletok.errors import (
    ConfigError,
    SampletokError,
    load_torch_dict,
    one_line,
    validated,
    validation_message,
    yaml_message,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn a user's whole past raw samples into tokens for ranking models (IAT, SIF).",
)
console = Console()


def _parse_params(items: list[str] | None) -> dict:
    """``key=value`` pairs, values parsed as YAML (numbers, lists, booleans)."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ConfigError(f"--param '{it}' is not key=value")
        k, v = it.split("=", 1)
        try:
            out[k] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ConfigError(f"--param {k}: value {v!r} is not valid YAML ({yaml_message(e)})") from None
    return out


def _train_config(**options):
    """TrainConfig from CLI options (named by their TrainConfig field); a bad value names the option."""
    from sampletok.train.trainer import TrainConfig

    return validated(TrainConfig, options, names=_TRAIN_FLAGS)


_TRAIN_FLAGS = {
    "max_epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "hist_len": "--hist-len",
    "device": "--device",
}


def _dataset_config(
    movielens: Path | None,
    files: list[Path] | None,
    schema: Path | None,
    synthetic: bool,
    prepared: Path | None,
    out: Path | None,
    users: int,
    fields: int,
    seed: int,
):
    from sampletok.train.experiment import DatasetConfig

    chosen = [x for x in (movielens, files, synthetic or None, prepared) if x]
    if len(chosen) != 1:
        raise ConfigError("give exactly one of --movielens, --files (with --schema), --synthetic, --data")
    if schema and not files:
        raise ConfigError("--schema is read only with --files")
    if movielens:
        return DatasetConfig(kind="movielens", path=str(movielens), prepared_dir=str(out) if out else None)
    if files:
        return DatasetConfig(
            kind="files",
            path=[str(f) for f in files][0] if len(files) == 1 else None,
            schema_path=str(schema) if schema else None,
            prepared_dir=str(out) if out else None,
        )
    if synthetic:
        return DatasetConfig(
            kind="synthetic",
            synthetic={"n_users": users, "n_fields": fields, "seed": seed},
            prepared_dir=str(out) if out else None,
        )
    return DatasetConfig(kind="prepared", path=str(prepared))


@app.command()
def prepare(
    movielens: Path | None = typer.Option(None, help="MovieLens folder (ml-100k or ml-latest/ml-25m layout)"),
    kuairand: Path | None = typer.Option(None, help="KuaiRand likes folder (likes.tsv + user_features.csv)"),
    files: list[Path] | None = typer.Option(None, "--files", help="CSV/TSV/Parquet raw-sample log"),
    schema: Path | None = typer.Option(None, help="schema YAML for --files"),
    synthetic: bool = typer.Option(False, help="generate a synthetic log"),
    users: int = typer.Option(2000, help="synthetic: users"),
    fields: int = typer.Option(24, help="synthetic: feature fields"),
    seed: int = typer.Option(0, help="synthetic: seed"),
    out: Path = typer.Option(..., help="prepared dataset directory"),
    force: bool = typer.Option(False, help="prepare again even if inputs are unchanged"),
    engine: str = typer.Option(
        "local", help="local, or ray: the encode pass as a Ray Data job, one task per file (--files; Ray extra)"
    ),
    append: list[Path] | None = typer.Option(
        None,
        "--append",
        help="CSV/TSV/Parquet files of new rows to add to the prepared dataset --out, with its vocabularies "
        "(new values → OOV) and split cut times",
    ),
):
    """Validate and encode a raw-sample log into a prepared (memory-mapped) dataset, or append new rows to one."""
    from sampletok.data.prepare import append as do_append
    from sampletok.data.prepare import prepare as do_prepare
    from sampletok.data.sources import FileSource, RawSource
    from sampletok.data.sources.movielens import load_movielens
    from sampletok.data.sources.synthetic import SyntheticConfig, generate_source
    from sampletok.schema import Schema

    if append:
        if movielens or kuairand or files or synthetic or schema:
            raise ConfigError("--append takes the new files alone: the schema is the prepared dataset's (--out)")
        if engine != "local" or force:
            raise ConfigError("--append runs on the local engine and never re-prepares: drop --engine / --force")
        ds = do_append(out, FileSource(append))
        last = ds.manifest["appended"][-1]
        console.print(
            f"appended [bold]{last['rows']:,}[/] rows to {out}: {ds.n_rows:,} rows of {ds.manifest['n_users']:,} "
            f"users (splits {ds.manifest['split_rows']}; {last['skipped_known_instances']:,} rows already there "
            f"skipped; {last['seconds']} s)"
        )
        return
    if kuairand and (movielens or files or synthetic):
        raise ConfigError("give exactly one of --movielens, --kuairand, --files (with --schema), --synthetic")
    if not kuairand:
        _dataset_config(movielens, files, schema, synthetic, None, out, users, fields, seed)
    source: RawSource
    if kuairand:
        from sampletok.data.sources.kuairand import load_kuairand

        source, sch = load_kuairand(kuairand)
    elif movielens:
        source, sch = load_movielens(movielens)
    elif files:
        if not schema:
            raise ConfigError("--files needs --schema")
        source, sch = FileSource(files), Schema.from_yaml(schema)
    else:
        syn = validated(
            SyntheticConfig,
            {"n_users": users, "n_fields": fields, "seed": seed},
            names={"n_users": "--users", "n_fields": "--fields", "seed": "--seed"},
        )
        source, sch = generate_source(syn)
    if engine not in ("local", "ray"):
        raise ConfigError(f"--engine must be local or ray, got '{engine}'")
    if engine == "ray" and not files:
        raise ConfigError("--engine ray reads --files (a folder of Parquet partitions or CSV files)")
    ds = do_prepare(source, sch, out, force=force, engine=cast(Literal["local", "ray"], engine))
    m = ds.manifest
    dups = m.get("duplicates") or {}
    removed = f"; {dups['rows_removed']:,} repeated rows removed ({dups['policy']})" if dups.get("rows_removed") else ""
    console.print(
        f"prepared [bold]{m['n_rows']:,}[/] rows of {m['n_users']:,} users into {out} "
        f"(splits {m['split_rows']}, {m['seconds']} s{removed})"
    )


@app.command()
def train(
    data: Path = typer.Option(..., help="prepared dataset directory"),
    model: str = typer.Option("din", help="model name (see `sampletok models`)"),
    param: list[str] | None = typer.Option(None, "--param", "-p", help="model parameter key=value"),
    seed: int = typer.Option(2021),
    epochs: int = typer.Option(20, help="max epochs"),
    batch_size: int = typer.Option(1024),
    lr: float = typer.Option(1e-3),
    out: Path = typer.Option(Path("runs/train"), help="run directory (checkpoint, model, result)"),
    restart: bool = typer.Option(
        False,
        help="ignore a checkpoint in --out and train afresh (by default a "
        "checkpoint of the same run is resumed, one of another run is refused)",
    ),
    device: str = typer.Option("auto", help="auto (CUDA when available) | cpu | cuda | cuda:N"),
    hist_len: int | None = typer.Option(None, help="history positions (default: the schema's sequence length)"),
):
    """Train one model on a prepared dataset; writes checkpoint.pt, model.pt and result.json. Under
    `torchrun --nproc-per-node N -m sampletok.cli train ...` it trains data-parallel (DDP)."""
    from sampletok import distributed
    from sampletok.data.dataset import IN_MEMORY_MAX_ROWS, PreparedDataset
    from sampletok.train.experiment import ModelSpec, run_model

    distributed.init()
    cfg = _train_config(max_epochs=epochs, batch_size=batch_size, lr=lr, device=device, hist_len=hist_len)
    ds = PreparedDataset(data).load_into_memory(max_rows=IN_MEMORY_MAX_ROWS)
    r = run_model(ds, ModelSpec(name=model, params=_parse_params(param)), cfg, seed, run_dir=out, resume=not restart)
    if not distributed.is_main():
        return
    console.print(
        f"{model}: test AUC {r['test']['auc']:.4f} GAUC {r['test']['gauc']:.4f} "
        f"LogLoss {r['test']['logloss']:.4f} (best epoch {r['best_epoch']}, "
        f"{r['train_samples_per_s']:.0f} train samples/s) → {out}"
    )


@app.command()
def evaluate(
    data: Path = typer.Option(..., help="prepared dataset directory"),
    run: Path = typer.Option(..., help="run directory written by `sampletok train`"),
    split: str = typer.Option("test", help="train | valid | test"),
    seen_users_only: bool = typer.Option(False, help="only rows of users seen in training"),
):
    """Evaluate a trained model on a split: AUC, GAUC, LogLoss."""
    from sampletok.data.dataset import IN_MEMORY_MAX_ROWS, PreparedDataset
    from sampletok.train.experiment import load_trained
    from sampletok.train.trainer import evaluate as do_eval

    if split not in ("train", "valid", "test"):
        raise ConfigError(f"--split: '{split}' is not one of train, valid, test")
    ds = PreparedDataset(data).load_into_memory(max_rows=IN_MEMORY_MAX_ROWS)
    trained = load_trained(ds, run)
    m = do_eval(trained.model, trained.loader(ds, ds.rows(split, seen_users_only)), progress=True)
    console.print(json.dumps(m, indent=1))


@app.command()
def compare(
    config: Path = typer.Argument(..., help="experiment YAML (configs/experiments/*.yaml)"),
    out: Path | None = typer.Option(None, help="output directory (default runs/<experiment name>)"),
    seeds: int | None = typer.Option(None, help="use the first N seeds 2021, 2022, ... instead"),
    models: str | None = typer.Option(None, help="comma-separated model labels to keep"),
    epochs: int | None = typer.Option(None, help="override max epochs"),
):
    """Run several models × seeds on one dataset: results.json, results.md (mean ± std, paired t-tests), plots.
    Under `torchrun --nproc-per-node N -m sampletok.cli compare ...` every run trains data-parallel."""
    from sampletok import distributed
    from sampletok.train.experiment import compare as do_compare

    distributed.init()
    exp = _experiment(config, seeds, models, epochs)
    do_compare(exp, out or Path("runs") / exp.name)


def _experiment(config: Path, seeds: int | None, models: str | None, epochs: int | None):
    """The experiment YAML with the --seeds, --models and --epochs options of compare and tune applied."""
    from sampletok.train.experiment import Experiment

    exp = Experiment.from_yaml(config)
    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds: must be at least 1 (got {seeds})")
        exp = exp.model_copy(update={"seeds": [2021 + i for i in range(seeds)]})
    if models is not None:
        keep = [m.strip() for m in models.split(",") if m.strip()]
        labels = [m.display for m in exp.models]
        unknown = [m for m in keep if m not in labels]
        if unknown or not keep:
            raise ConfigError(
                f"--models: no model labelled {', '.join(unknown) or repr(models)} in {config} "
                f"(labels: {', '.join(labels)})"
            )
        exp = exp.model_copy(update={"models": [m for m in exp.models if m.display in keep]})
    if epochs is not None:
        train = validated(
            type(exp.train), {**exp.train.model_dump(), "max_epochs": epochs}, names={"max_epochs": "--epochs"}
        )
        exp = exp.model_copy(update={"train": train})
    return exp


@app.command()
def tune(
    config: Path = typer.Argument(..., help="experiment YAML (configs/experiments/*.yaml)"),
    trials: int | None = typer.Option(None, help="trials per model, the same for every model (default: tune.trials)"),
    out: Path | None = typer.Option(None, help="output directory (default runs/<experiment name>)"),
    seeds: int | None = typer.Option(None, help="rerun the tuned models with the first N seeds 2021, 2022, ..."),
    models: str | None = typer.Option(None, help="comma-separated model labels to keep"),
    epochs: int | None = typer.Option(None, help="override max epochs (trials and reruns)"),
    restart: bool = typer.Option(False, help="delete the studies in OUT/tune and search afresh"),
):
    """Equal-budget tuning: search each model's declared space with Optuna (TPE, median pruning) on the
    validation split only, the same number of trials for every model, then rerun each model's best
    configuration with every seed. Studies in OUT/tune/<label>.db (an interrupted tune resumes); writes
    OUT/tune/report.md, tuned.json, tuned.yaml (rerun it with `sampletok compare`) and OUT/tune/tuned/."""
    from sampletok.train.tune import study_path
    from sampletok.train.tune import tune as do_tune

    exp = _experiment(config, seeds, models, epochs)
    if trials is not None:
        if trials < 1:
            raise ConfigError(f"--trials: must be at least 1 (got {trials})")
        exp = exp.model_copy(update={"tune": exp.tune.model_copy(update={"trials": trials})})
    out = out or Path("runs") / exp.name
    if restart:
        for spec in exp.models:
            study_path(out, spec.display).unlink(missing_ok=True)
    do_tune(exp, out)


@app.command()
def serve(
    data: Path = typer.Option(..., help="prepared dataset directory the run was trained on"),
    run: Path = typer.Option(..., help="run directory written by `sampletok train` or `compare`"),
    store: str = typer.Option(
        "runs/serve-store", help="where the service's event and token stores live: a directory or redis://host:port/db"
    ),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    reset: bool = typer.Option(False, help="rebuild the stores from the dataset (dropping appended events)"),
    max_candidates: int = typer.Option(1000, help="the most candidates one request may carry"),
    max_body_bytes: int = typer.Option(1 << 20, help="the largest request body in bytes (413 above it)"),
    token_file: Path | None = typer.Option(
        None, help="a file holding a bearer token that /score, /events and /schema then require (/healthz stays open)"
    ),
    expose_history_gap: bool = typer.Option(
        False, help="reply with the age of each request's most recent history event (trusted callers only)"
    ),
    max_batch_candidates: str = typer.Option(
        "auto",
        help="dynamic batching: the most candidates of concurrent requests scored in one forward, or auto (chosen "
        "at start by timing the model on a probe request alone and in groups of 2-8)",
    ),
    probe_candidates: int = typer.Option(100, help="auto batching: the candidates of the probe request it times"),
    max_wait_us: int = typer.Option(500, help="dynamic batching: how long a batch waits for more requests (µs)"),
    max_queue: int = typer.Option(16, help="requests waiting beyond this are refused with 503 and Retry-After"),
    workers: int = typer.Option(1, help="service processes over one store (more than one needs a redis:// store)"),
    threads: int = typer.Option(1, help="torch threads per process (scale out with --workers)"),
):
    """Serve a trained model over HTTP: POST /score, POST /events, GET /healthz, GET /metrics (the serve
    extra). The stores are made from the dataset on first start (every prepared row as history)."""
    from sampletok.data.dataset import PreparedDataset
    from sampletok.errors import validated
    from sampletok.serving.app import WORKER_ENV, create_app, settle_process, worker_spec
    from sampletok.serving.config import ServingConfig, read_token_file
    from sampletok.serving.scorer import Scorer

    try:
        import uvicorn
    except ImportError:
        raise SampletokError("the service needs the serve extra: pip install 'sampletok[serve]'") from None
    cfg = validated(
        ServingConfig,
        dict(
            host=host,
            port=port,
            store=store,
            reset=reset,
            max_candidates=max_candidates,
            max_body_bytes=max_body_bytes,
            token=read_token_file(token_file) if token_file else None,
            expose_history_gap=expose_history_gap,
            max_batch_candidates=max_batch_candidates,
            probe_candidates=probe_candidates,
            max_wait_us=max_wait_us,
            max_queue=max_queue,
            workers=workers,
            threads=threads,
        ),
        where="serve",
    )
    ds = PreparedDataset(data)
    with console.status("opening the stores (made from the dataset on first start)"):
        scorer = Scorer.from_run(ds, run, cfg.store, reset=cfg.reset, max_candidates=cfg.max_candidates)
    console.print(
        f"serving {run} from {cfg.store} on http://{cfg.host}:{cfg.port} (POST /score, POST /events), "
        f"{cfg.workers} worker process(es)"
    )
    if cfg.workers == 1:
        settle_process(cfg)
        uvicorn.run(create_app(scorer, cfg), host=cfg.host, port=cfg.port, log_level="warning")
        return
    # several processes over one Redis store: the stores exist now (made once, here); each worker opens them
    del scorer
    os.environ[WORKER_ENV] = worker_spec(data, run, cfg.model_copy(update={"reset": False}), token_file)
    uvicorn.run(
        "sampletok.serving.app:worker_app",
        factory=True,
        workers=cfg.workers,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
    )


@app.command("models")
def list_models():
    """List the registered model names."""
    from sampletok.models import MODELS

    for name, cls in sorted(MODELS.items()):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        console.print(f"[bold]{name}[/]: {doc[0] if doc else ''}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="output directory"),
    quick: bool = typer.Option(False, help="smaller data and fewer epochs (for smoke tests)"),
):
    """End to end on the embedded synthetic default: generate → prepare → train baselines (and IAT, SIF where
    available) → results table and report. No download."""
    from sampletok.demo import run_demo

    run_demo(out, quick=quick)


iat_app = typer.Typer(no_args_is_help=True, help="IAT: source models and instance-token export.")
app.add_typer(iat_app, name="iat")


@iat_app.command("build")
def iat_build(
    data: Path = typer.Option(..., help="prepared dataset directory"),
    store: Path = typer.Option(..., help="token store directory to (re)write"),
    scheme: str = typer.Option("user", help="temporal | user | user_stream"),
    param: list[str] | None = typer.Option(None, "--param", "-p", help="IATSourceConfig field key=value"),
    seed: int = typer.Option(2021),
    engine: str = typer.Option("local", help="local | ray: the embedding passes as Ray Data jobs (ray extra)"),
):
    """Train a source model and export every instance's token, time-causally by default (fold k's tokens from
    the state trained on earlier folds only; `-p export_order=in_sample` for the leaky ablation)."""
    from sampletok.data.dataset import IN_MEMORY_MAX_ROWS, PreparedDataset
    from sampletok.tokens.iat import build_store, source_model_path

    if engine not in ("local", "ray"):
        raise ConfigError(f"--engine must be local or ray, got '{engine}'")
    ds = PreparedDataset(data).load_into_memory(max_rows=IN_MEMORY_MAX_ROWS)
    cfg = _source_config(scheme, _parse_params(param))
    st = build_store(ds, cfg, seed, store, engine=cast(Literal["local", "ray"], engine))
    console.print(
        f"exported {len(st):,} {cfg.export_order} instance tokens → {store} (producer "
        f"{st.meta['producer']}; final source model {source_model_path(store)})",
        soft_wrap=True,
    )


@iat_app.command("append")
def iat_append(
    data: Path = typer.Option(..., help="the prepared dataset, grown by `sampletok prepare --append`"),
    store: Path = typer.Option(..., help="the token store `iat build` wrote from it before it grew"),
):
    """Add the new rows' tokens to an IAT store (one new committed version), embedded by its final source
    model: equal to building the store again when the new rows lie after the training window."""
    from sampletok.data.dataset import IN_MEMORY_MAX_ROWS, PreparedDataset
    from sampletok.store import LocalTokenStore
    from sampletok.tokens.iat import append_tokens

    ds = PreparedDataset(data).load_into_memory(max_rows=IN_MEMORY_MAX_ROWS)
    before = len(LocalTokenStore.open(store))
    st = append_tokens(store, ds)
    console.print(f"appended {len(st) - before:,} instance tokens → {store} ({len(st):,} in all)", soft_wrap=True)


def _source_config(scheme: str, params: dict):
    from sampletok.tokenizers.iat import IATSourceConfig

    return validated(
        IATSourceConfig,
        {"scheme": scheme, **params},
        "IAT source config",
        names={
            "scheme": "-p scheme" if "scheme" in params else "--scheme",
            **{k: f"-p {k}" for k in params if k != "scheme"},
        },
    )


@iat_app.command("fit-source")
def iat_fit_source(
    data: Path = typer.Option(..., help="prepared dataset directory"),
    out: Path = typer.Option(..., help="where to save the source model (.pt)"),
    scheme: str = typer.Option("user", help="temporal | user | user_stream"),
    param: list[str] | None = typer.Option(None, "--param", "-p", help="IATSourceConfig field key=value"),
    seed: int = typer.Option(2021),
):
    """Train an IAT source model on the whole training window (for `iat export`: an in-sample export; the
    time-causal store downstream training should read is `iat build`'s)."""
    import torch

    from sampletok.data.dataset import IN_MEMORY_MAX_ROWS, PreparedDataset
    from sampletok.tokens.iat_source import train_source

    ds = PreparedDataset(data).load_into_memory(max_rows=IN_MEMORY_MAX_ROWS)
    cfg = _source_config(scheme, _parse_params(param)).model_copy(update={"export_order": "in_sample"})
    model = train_source(ds, cfg, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.model_dump(), "state_dict": model.state_dict(), "dataset": ds.fingerprint}, out)
    console.print(f"source model ({cfg.scheme}-order, {cfg.emb_dim}-d InsEmb) → {out}")


@iat_app.command("export")
def iat_export(
    data: Path = typer.Option(..., help="prepared dataset directory"),
    model: Path = typer.Option(..., help="source model written by `sampletok iat fit-source`"),
    store: Path = typer.Option(..., help="token store directory to (re)write"),
    dtype: str | None = typer.Option(None, help="payload dtype: float16 | float32 | int8"),
):
    """Embed every instance with one source model (in-sample: training-window tokens come from parameters that
    saw later labels; use `iat build` for the causal store) and write the tokens (+ labels) to a token store."""

    from sampletok.data.dataset import IN_MEMORY_MAX_ROWS, PreparedDataset
    from sampletok.features import FeatureLayout
    from sampletok.tokenizers.iat import IATSourceConfig, SourceModel
    from sampletok.tokens.iat import export_to_store

    ds = PreparedDataset(data).load_into_memory(max_rows=IN_MEMORY_MAX_ROWS)
    saved = load_torch_dict(
        model,
        {"config", "state_dict", "dataset"},
        "source model",
        "write one with `sampletok iat fit-source`",
        option="--model",
    )
    if saved.get("dataset") != ds.fingerprint:
        raise ConfigError(f"{model}: trained on dataset {saved.get('dataset')}, not {ds.fingerprint}")
    cfg = validated(
        IATSourceConfig,
        {**saved["config"], **({"dtype": dtype} if dtype else {})},
        "IAT source config",
        names={"dtype": "--dtype"},
    )
    src = SourceModel(FeatureLayout.from_dataset(ds), cfg)
    src.load_state_dict(saved["state_dict"])
    st = export_to_store(src, ds, store)
    b = st.bytes_per_instance()
    console.print(
        f"exported {len(st):,} instance tokens → {store} "
        f"({st.meta['export_instances_per_s']:,.0f} instances/s, {b['payload']:.0f} payload bytes "
        f"+ {b['keys'] + b['responses']:.0f} key/response bytes per instance, producer {st.meta['producer']})"
    )


sif_app = typer.Typer(no_args_is_help=True, help="SIF: HGAQ sample tokenizer + SIF-Mixer, code export.")
app.add_typer(sif_app, name="sif")


@sif_app.command("fit")
def sif_fit(
    data: Path = typer.Option(..., help="prepared dataset directory"),
    out: Path = typer.Option(Path("runs/sif"), help="run directory"),
    param: list[str] | None = typer.Option(None, "--param", "-p", help="SIF parameter key=value (hgaq={...})"),
    hist_len: int = typer.Option(20, help="history rows L"),
    epochs: int = typer.Option(5),
    seed: int = typer.Option(2021),
):
    """Jointly train the HGAQ tokenizer and the SIF-Mixer (history quantized on the fly)."""
    from sampletok.data.dataset import IN_MEMORY_MAX_ROWS, PreparedDataset
    from sampletok.train.experiment import ModelSpec, run_model

    ds = PreparedDataset(data).load_into_memory(max_rows=IN_MEMORY_MAX_ROWS)
    cfg = _train_config(max_epochs=epochs, hist_len=hist_len)
    r = run_model(ds, ModelSpec(name="sif", params=_parse_params(param)), cfg, seed, run_dir=out)
    console.print(f"sif: test AUC {r['test']['auc']:.4f} GAUC {r['test']['gauc']:.4f} → {out}")


@sif_app.command("export")
def sif_export(
    data: Path = typer.Option(..., help="prepared dataset directory"),
    run: Path = typer.Option(..., help="run directory of `sampletok sif fit`"),
    store: Path = typer.Option(..., help="token store directory to (re)write"),
):
    """Frozen export of every instance's HGAQ codes (T × M, uint8 for V ≤ 256, else uint16) to a token store."""
    from sampletok.data.dataset import IN_MEMORY_MAX_ROWS, PreparedDataset
    from sampletok.models.sif import SIF
    from sampletok.tokens.sif import export_codes
    from sampletok.train.experiment import load_trained

    ds = PreparedDataset(data).load_into_memory(max_rows=IN_MEMORY_MAX_ROWS)
    model = load_trained(ds, run).model
    if model.name != "sif":
        raise ConfigError(
            f"--run {run}: holds a '{model.name}' model, not a SIF model (train one with `sampletok sif fit`)"
        )
    sif = cast(SIF, model)
    st = export_codes(sif.eval(), ds, store)
    b = st.bytes_per_instance()
    console.print(
        f"exported codes of {len(st):,} instances → {store} ({st.meta['export_instances_per_s']:,.0f} "
        f"instances/s, {b['payload']:.0f} payload bytes per instance, codebook {st.meta['codebook_version']})"
    )
    from sampletok.report.codebooks import write_codebook_report

    u = write_codebook_report(
        np.asarray(st.load_into_memory().columns()["payload"]),
        sif.cfg.codes,
        run,
        sif.tokenizer.sub_tokens,
        sif.tokenizer.rvq.sizes,
    )
    console.print(
        f"codebook utilization: mean perplexity {u['mean_perplexity']:.1f} of at most {sif.cfg.codes}, "
        f"{u['dead_fraction']:.1%} codes unused → {run / 'codebooks.png'}"
    )


@app.command()
def report(
    results: list[Path] = typer.Argument(
        ..., help="output folder(s) of `sampletok compare` (or their results.json); several are merged"
    ),
    reference: str = typer.Option(..., help="label of the model every other is compared with"),
    against: list[str] | None = typer.Option(None, help="label to compare (repeatable; default: every other)"),
    metric: str | None = typer.Option(
        None,
        help="order the rows by this metric's Δ, best first: auc, gauc or logloss (default: the order of the results)",
    ),
    out: Path | None = typer.Option(
        None,
        help="markdown file to write (default, in the first results folder: pairwise-REFERENCE[-vs-AGAINST…].md)",
    ),
    by_history: bool = typer.Option(
        False, help="also ΔAUC per history-length bucket of the test requests (TrainConfig.history_buckets)"
    ),
    split: str = typer.Option(
        "test", help="test, or valid: the best epochs' validation figures (choose options by these, not by test)"
    ),
):
    """Each model vs the reference, paired over the seeds both ran: n, mean Δ and paired-t p of test (or
    validation) AUC, GAUC and LogLoss (rows with fewer than 3 paired seeds are marked as indicative)."""
    import re

    from sampletok.report.tables import history_bucket_table, load_results, pairwise_rich, pairwise_table

    runs = load_results(results)
    md = pairwise_table(runs, reference, against or None, metric, split)
    title = f"paired over shared seeds, vs {reference}" + (" (validation split)" if split == "valid" else "")
    console.print(pairwise_rich(runs, reference, against or None, metric, title=title, split=split))
    first = results[0] if results[0].is_dir() else results[0].parent
    # a report of chosen rows gets a file of its own, so it never replaces the reference's full table
    name = "-vs-".join(re.sub(r"[^A-Za-z0-9_.+-]+", "_", label) for label in [reference, *(against or [])])
    path = out or first / f"pairwise-{name}{'-valid' if split == 'valid' else ''}.md"
    sources = ", ".join(f"`{r}`" for r in results)
    text = (
        f"{'Validation' if split == 'valid' else 'Test'} metrics paired over the seeds both models ran "
        f"(`sampletok report`, from {sources}); "
        f"Δ = model − {reference}, p: two-sided paired t-test.\n\n{md}\n"
    )
    if by_history:
        buckets = history_bucket_table(runs, reference, against or None)
        console.print(buckets)
        text += f"\nBy the test request's number of past events (mean AUC, paired ΔAUC, p):\n\n{buckets}\n"
    path.write_text(text)
    console.print(f"→ {path}")


def _print_error(message: str) -> None:
    """``error: message`` on stderr as exactly one line, whatever the terminal width (no wrapping, no markup)."""
    from rich.text import Text

    Console(stderr=True, soft_wrap=True).print(Text.assemble(("error:", "red"), " ", one_line(message)))


def main() -> None:
    import importlib

    from pydantic import ValidationError

    try:  # typer >= 0.2x vendors click; older typer runs on the click package
        click_errors = importlib.import_module("typer._click.exceptions")
    except ImportError:  # pragma: no cover
        click_errors = importlib.import_module("click.exceptions")
    ClickException = click_errors.ClickException
    NoArgsIsHelpError = getattr(click_errors, "NoArgsIsHelpError", ())  # click < 8.2 has none

    try:
        code = app(standalone_mode=False)
    except SampletokError as e:
        _print_error(str(e))
        sys.exit(2)
    except OSError as e:  # a path the user gave cannot be read or written: name it, one line
        _print_error(f"{e.filename or ''}: {e.strerror or e}" if e.filename else str(e))
        sys.exit(2)
    except ValidationError as e:  # a configuration not validated where it was built: still one line
        _print_error(
            f"invalid {e.title}: {validation_message(e, names=_TRAIN_FLAGS if e.title == 'TrainConfig' else None)}"
        )
        sys.exit(2)
    except NoArgsIsHelpError as e:  # the help was printed already (as typer does in standalone mode)
        sys.exit(e.exit_code)
    except ClickException as e:  # usage errors (missing option, bad value, unknown command): one line too
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _print_error(e.format_message() + hint)
        sys.exit(e.exit_code)
    except typer.Abort:
        _print_error("aborted")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
