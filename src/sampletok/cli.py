"""The ``sampletok`` command line. Errors meant for the user are printed as one line (exit code 2)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import typer
import yaml
from rich.console import Console

from sampletok.errors import SampletokError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a user's whole past raw samples into tokens for ranking models (IAT, SIF).")
console = Console()


def _parse_params(items: list[str]) -> dict:
    """``key=value`` pairs, values parsed as YAML (numbers, lists, booleans)."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise SampletokError(f"parameter '{it}' is not key=value")
        k, v = it.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def _dataset_config(movielens: Optional[Path], files: Optional[list[Path]], schema: Optional[Path],
                    synthetic: bool, prepared: Optional[Path], out: Optional[Path], users: int, fields: int,
                    seed: int):
    from sampletok.train.experiment import DatasetConfig

    chosen = [x for x in (movielens, files, synthetic or None, prepared) if x]
    if len(chosen) != 1:
        raise SampletokError("give exactly one of --movielens, --files (with --schema), --synthetic, --data")
    if movielens:
        return DatasetConfig(kind="movielens", path=str(movielens), prepared_dir=str(out) if out else None)
    if files:
        return DatasetConfig(kind="files", path=[str(f) for f in files][0] if len(files) == 1 else None,
                             schema_path=str(schema) if schema else None, prepared_dir=str(out) if out else None)
    if synthetic:
        return DatasetConfig(kind="synthetic", synthetic={"n_users": users, "n_fields": fields, "seed": seed},
                             prepared_dir=str(out) if out else None)
    return DatasetConfig(kind="prepared", path=str(prepared))


@app.command()
def prepare(
    movielens: Optional[Path] = typer.Option(None, help="MovieLens folder (ml-100k or ml-latest/ml-25m layout)"),
    files: Optional[list[Path]] = typer.Option(None, "--files", help="CSV/TSV/Parquet raw-sample log"),
    schema: Optional[Path] = typer.Option(None, help="schema YAML for --files"),
    synthetic: bool = typer.Option(False, help="generate a synthetic log"),
    users: int = typer.Option(2000, help="synthetic: users"),
    fields: int = typer.Option(24, help="synthetic: feature fields"),
    seed: int = typer.Option(0, help="synthetic: seed"),
    out: Path = typer.Option(..., help="prepared dataset directory"),
    force: bool = typer.Option(False, help="prepare again even if inputs are unchanged"),
):
    """Validate and encode a raw-sample log into a prepared (memory-mapped) dataset."""
    from sampletok.data.prepare import prepare as do_prepare
    from sampletok.data.sources import FileSource
    from sampletok.data.sources.movielens import load_movielens
    from sampletok.data.sources.synthetic import SyntheticConfig, generate_source
    from sampletok.schema import Schema

    _dataset_config(movielens, files, schema, synthetic, None, out, users, fields, seed)
    if movielens:
        source, sch = load_movielens(movielens)
    elif files:
        if not schema:
            raise SampletokError("--files needs --schema")
        source, sch = FileSource(files), Schema.from_yaml(schema)
    else:
        source, sch = generate_source(SyntheticConfig(n_users=users, n_fields=fields, seed=seed))
    ds = do_prepare(source, sch, out, force=force)
    m = ds.manifest
    console.print(f"prepared [bold]{m['n_rows']:,}[/] rows of {m['n_users']:,} users into {out} "
                  f"(splits {m['split_rows']}, {m['seconds']} s)")


@app.command()
def train(
    data: Path = typer.Option(..., help="prepared dataset directory"),
    model: str = typer.Option("din", help="model name (see `sampletok models`)"),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", help="model parameter key=value"),
    seed: int = typer.Option(2021),
    epochs: int = typer.Option(20, help="max epochs"),
    batch_size: int = typer.Option(1024),
    lr: float = typer.Option(1e-3),
    out: Path = typer.Option(Path("runs/train"), help="run directory (checkpoint, model, result)"),
    resume: bool = typer.Option(True, help="resume from a checkpoint in --out"),
):
    """Train one model on a prepared dataset; writes checkpoint.pt, model.pt and result.json."""
    from sampletok.data.prepare import PreparedDataset
    from sampletok.train.experiment import ModelSpec, run_model
    from sampletok.train.trainer import TrainConfig

    ds = PreparedDataset(data).load_into_memory()
    cfg = TrainConfig(max_epochs=epochs, batch_size=batch_size, lr=lr)
    r = run_model(ds, ModelSpec(name=model, params=_parse_params(param)), cfg, seed, run_dir=out, resume=resume)
    console.print(f"{model}: test AUC {r['test']['auc']:.4f} GAUC {r['test']['gauc']:.4f} "
                  f"LogLoss {r['test']['logloss']:.4f} (best epoch {r['best_epoch']}, "
                  f"{r['train_samples_per_s']:.0f} train samples/s) → {out}")


@app.command()
def evaluate(
    data: Path = typer.Option(..., help="prepared dataset directory"),
    run: Path = typer.Option(..., help="run directory written by `sampletok train`"),
    split: str = typer.Option("test", help="train | valid | test"),
    seen_users_only: bool = typer.Option(False, help="only rows of users seen in training"),
):
    """Evaluate a trained model on a split: AUC, GAUC, LogLoss."""
    from sampletok.data.batches import BatchLoader
    from sampletok.data.prepare import PreparedDataset
    from sampletok.train.experiment import load_trained
    from sampletok.train.trainer import evaluate as do_eval

    if split not in ("train", "valid", "test"):
        raise SampletokError(f"unknown split '{split}'")
    ds = PreparedDataset(data).load_into_memory()
    model, hist_len = load_trained(ds, run)
    m = do_eval(model, BatchLoader(ds, ds.rows(split, seen_users_only), 4096, hist_len=hist_len), progress=True)
    console.print(json.dumps(m, indent=1))


@app.command()
def compare(
    config: Path = typer.Argument(..., help="experiment YAML (configs/experiments/*.yaml)"),
    out: Optional[Path] = typer.Option(None, help="output directory (default runs/<experiment name>)"),
    seeds: Optional[int] = typer.Option(None, help="use the first N seeds 2021, 2022, ... instead"),
    models: Optional[str] = typer.Option(None, help="comma-separated model labels to keep"),
    epochs: Optional[int] = typer.Option(None, help="override max epochs"),
):
    """Run several models × seeds on one dataset: results.json, results.md (mean ± std, paired t-tests), plots."""
    from sampletok.train.experiment import Experiment, compare as do_compare

    exp = Experiment.from_yaml(config)
    if seeds:
        exp = exp.model_copy(update={"seeds": [2021 + i for i in range(seeds)]})
    if models:
        keep = models.split(",")
        exp = exp.model_copy(update={"models": [m for m in exp.models if m.display in keep]})
        if not exp.models:
            raise SampletokError(f"no model labelled {keep} in {config}")
    if epochs:
        exp = exp.model_copy(update={"train": exp.train.model_copy(update={"max_epochs": epochs})})
    do_compare(exp, out or Path("runs") / exp.name)


@app.command("models")
def list_models():
    """List the registered model names."""
    from sampletok.models import MODELS

    for name, cls in sorted(MODELS.items()):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        console.print(f"[bold]{name}[/]: {doc[0] if doc else ''}")


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="output directory"),
         quick: bool = typer.Option(False, help="smaller data and fewer epochs (for smoke tests)")):
    """End to end on the embedded synthetic default: generate → prepare → train baselines (and IAT, SIF where
    available) → results table and report. No download."""
    from sampletok.demo import run_demo

    run_demo(out, quick=quick)


iat_app = typer.Typer(no_args_is_help=True, help="IAT: source models and instance-token export.")
app.add_typer(iat_app, name="iat")


@iat_app.command("fit-source")
def iat_fit_source(
    data: Path = typer.Option(..., help="prepared dataset directory"),
    out: Path = typer.Option(..., help="where to save the source model (.pt)"),
    scheme: str = typer.Option("user", help="temporal | user | user_stream"),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", help="IATSourceConfig field key=value"),
    seed: int = typer.Option(2021),
):
    """Train an IAT source model on the training window of a prepared dataset."""
    import torch

    from sampletok.data.prepare import PreparedDataset
    from sampletok.tokenizers.iat import IATSourceConfig, train_source

    ds = PreparedDataset(data).load_into_memory()
    cfg = IATSourceConfig(scheme=scheme, **_parse_params(param))
    model = train_source(ds, cfg, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.model_dump(), "state_dict": model.state_dict(), "dataset": ds.fingerprint}, out)
    console.print(f"source model ({cfg.scheme}-order, {cfg.emb_dim}-d InsEmb) → {out}")


@iat_app.command("export")
def iat_export(
    data: Path = typer.Option(..., help="prepared dataset directory"),
    model: Path = typer.Option(..., help="source model written by `sampletok iat fit-source`"),
    store: Path = typer.Option(..., help="token store directory to (re)write"),
    dtype: Optional[str] = typer.Option(None, help="payload dtype: float16 | float32 | int8"),
):
    """Embed every instance with a source model and write the tokens (+ labels) to a token store."""
    import torch

    from sampletok.data.batches import FeatureLayout
    from sampletok.data.prepare import PreparedDataset
    from sampletok.tokenizers.iat import IATSourceConfig, SourceModel, export_to_store

    ds = PreparedDataset(data).load_into_memory()
    saved = torch.load(model, weights_only=False)
    if saved.get("dataset") != ds.fingerprint:
        raise SampletokError(f"{model}: trained on dataset {saved.get('dataset')}, not {ds.fingerprint}")
    cfg = IATSourceConfig(**{**saved["config"], **({"dtype": dtype} if dtype else {})})
    src = SourceModel(FeatureLayout.from_dataset(ds), cfg)
    src.load_state_dict(saved["state_dict"])
    st = export_to_store(src, ds, store)
    b = st.bytes_per_instance()
    console.print(f"exported {len(st):,} instance tokens → {store} "
                  f"({st.meta['export_instances_per_s']:,.0f} instances/s, {b['payload']:.0f} payload bytes "
                  f"+ {b['keys'] + b['side']:.0f} key/side bytes per instance, producer {st.meta['producer']})")


sif_app = typer.Typer(no_args_is_help=True, help="SIF: HGAQ sample tokenizer + SIF-Mixer, code export.")
app.add_typer(sif_app, name="sif")


@sif_app.command("fit")
def sif_fit(
    data: Path = typer.Option(..., help="prepared dataset directory"),
    out: Path = typer.Option(Path("runs/sif"), help="run directory"),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", help="SIF parameter key=value (hgaq={...})"),
    hist_len: int = typer.Option(20, help="history rows L"),
    epochs: int = typer.Option(5),
    seed: int = typer.Option(2021),
):
    """Jointly train the HGAQ tokenizer and the SIF-Mixer (history quantized on the fly)."""
    from sampletok.data.prepare import PreparedDataset
    from sampletok.train.experiment import ModelSpec, run_model
    from sampletok.train.trainer import TrainConfig

    ds = PreparedDataset(data).load_into_memory()
    r = run_model(ds, ModelSpec(name="sif", params=_parse_params(param)),
                  TrainConfig(max_epochs=epochs, hist_len=hist_len), seed, run_dir=out)
    console.print(f"sif: test AUC {r['test']['auc']:.4f} GAUC {r['test']['gauc']:.4f} → {out}")


@sif_app.command("export")
def sif_export(
    data: Path = typer.Option(..., help="prepared dataset directory"),
    run: Path = typer.Option(..., help="run directory of `sampletok sif fit`"),
    store: Path = typer.Option(..., help="token store directory to (re)write"),
):
    """Frozen export of every instance's HGAQ codes (uint8 T × M) to a token store."""
    from sampletok.data.prepare import PreparedDataset
    from sampletok.models.sif import export_codes
    from sampletok.train.experiment import load_trained

    ds = PreparedDataset(data).load_into_memory()
    model, _ = load_trained(ds, run)
    st = export_codes(model.eval(), ds, store)
    b = st.bytes_per_instance()
    console.print(f"exported codes of {len(st):,} instances → {store} ({st.meta['export_instances_per_s']:,.0f} "
                  f"instances/s, {b['payload']:.0f} payload bytes per instance, codebook {st.meta['codebook_version']})")
    from sampletok.report.codebooks import write_codebook_report

    u = write_codebook_report(np.asarray(st.load_into_memory()._columns()["payload"]), model.cfg.codes, run,
                              model.tokenizer.sub_tokens)
    console.print(f"codebook utilization: mean perplexity {u['mean_perplexity']:.1f} of {model.cfg.codes}, "
                  f"{u['dead_fraction']:.1%} codes unused → {run / 'codebooks.png'}")


def main() -> None:
    try:
        app()
    except SampletokError as e:
        Console(stderr=True).print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
