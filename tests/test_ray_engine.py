"""`prepare --engine ray` on a local Ray cluster of two workers, started and stopped here."""

import json
import os

import numpy as np
import pytest

from sampletok.data.dataset import PreparedDataset, SplitSpec
from sampletok.data.prepare import prepare
from sampletok.data.sources.files import FileSource
from sampletok.data.sources.synthetic import SyntheticConfig, generate_source
from sampletok.errors import DataError

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'sampletok[ray]')")

CFG = SyntheticConfig(n_users=150, n_items=300, events_per_user=30, n_fields=18, days=20, seed=7)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def partitions(tmp_path_factory):
    """The log as a folder of Parquet partitions (one per user block), rows in no time order."""
    src, schema = generate_source(CFG)
    folder = tmp_path_factory.mktemp("parts")
    frame = src.to_frame().sample(fraction=1.0, shuffle=True, seed=0)
    paths = []
    for i, start in enumerate(range(0, frame.height, frame.height // 5 + 1)):
        p = folder / f"part-{i:03d}.parquet"
        frame.slice(start, frame.height // 5 + 1).write_parquet(p)
        paths.append(p)
    return schema, paths


def _manifest(ds: PreparedDataset) -> dict:
    return {k: v for k, v in ds.manifest.items() if k not in ("created_at", "seconds")}


def test_ray_engine_output_equals_the_local_engine(cluster, partitions, tmp_path):
    schema, paths = partitions
    split = SplitSpec(train=0.7, valid=0.15, test=0.15)
    local = prepare(FileSource(paths, chunk_rows=700), schema, tmp_path / "local", split, progress=False)
    distributed = prepare(
        FileSource(paths, chunk_rows=700), schema, tmp_path / "ray", split, progress=False, engine="ray"
    )
    assert _manifest(distributed) == _manifest(local)
    for name in local.manifest["columns"]:
        np.testing.assert_array_equal(distributed.col(name), local.col(name), err_msg=name)
    assert len(ray.nodes()) == 1 and ray.cluster_resources()["CPU"] == 2


def test_a_failed_ray_task_leaves_the_previous_dataset_readable(cluster, partitions, tmp_path, monkeypatch):
    schema, paths = partitions
    out = tmp_path / "ds"
    before = prepare(FileSource(paths), schema, out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    # a partition that fails in its Ray task: it is gone when the encode pass reads it (passes 1 and 2 ran)
    import shutil

    import sampletok.data.ray_engine as engine

    doomed = tmp_path / "doomed.parquet"
    shutil.copy(paths[-1], doomed)
    entered = []
    real = engine.encode_with_ray

    def remove_then_encode(*args, **kwargs):
        entered.append(1)
        doomed.unlink()
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "encode_with_ray", remove_then_encode)
    with pytest.raises(DataError, match="file not found") as e:
        prepare(FileSource([*paths[:-1], doomed]), schema, out, progress=False, force=True, engine="ray")
    assert entered and "doomed.parquet" in str(e.value) and "\n" not in str(e.value)  # the task's own error
    after = PreparedDataset(out)
    assert after.manifest == manifest and after.n_rows == before.n_rows
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".ds.tmp")]


def test_cli_prepare_a_folder_of_partitions_with_ray(partitions, tmp_path):
    from tests.test_cli import _cli

    schema, paths = partitions
    schema.to_yaml(tmp_path / "schema.yaml")
    folder = paths[0].parent
    args = ("prepare", "--files", str(folder), "--schema", str(tmp_path / "schema.yaml"))
    r = _cli(*args, "--out", str(tmp_path / "ray"), "--engine", "ray")  # starts and stops its own local cluster
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli(*args, "--out", str(tmp_path / "local"))
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = PreparedDataset(tmp_path / "ray"), PreparedDataset(tmp_path / "local")
    assert a.manifest["columns"] == b.manifest["columns"]  # checksums of every column file
    r = _cli(*args, "--out", str(tmp_path / "x"), "--engine", "spark")
    assert r.returncode == 2 and "--engine must be local or ray" in r.stderr


def _small_sif(ds):
    import torch

    from sampletok.data.batches import BatchLoader
    from sampletok.features import FeatureLayout
    from sampletok.models import build_model

    torch.manual_seed(0)
    model = build_model(
        "sif", FeatureLayout.from_dataset(ds), hgaq={"fields_per_token": 4, "codes": 32}, width=16, blocks=1, heads=2
    )
    rows = ds.rows("train")[:512]
    model.train()(BatchLoader(ds, rows, 512, hist_len=5, history_samples=True).build(rows))  # data-init codebooks
    return model.eval()


def test_ray_code_export_equals_the_local_export(cluster, partitions, tmp_path):
    from sampletok.store import LocalTokenStore
    from sampletok.tokens.sif import export_codes

    schema, paths = partitions
    ds = prepare(FileSource(paths), schema, tmp_path / "ds", progress=False)
    model = _small_sif(ds)
    local = export_codes(model, ds, tmp_path / "local", progress=False, rows_per_segment=1000)
    remote = export_codes(model, ds, tmp_path / "ray", progress=False, rows_per_segment=1000, engine="ray")
    assert len(remote.manifest["segments"]) == len(local.manifest["segments"]) > 2
    a, b = LocalTokenStore.open(local.root).columns(), LocalTokenStore.open(remote.root).columns()
    for name in ("instance_id", "user", "ts", "payload", "responses", "known_at"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_failed_ray_export_task_leaves_the_previous_store_readable(cluster, partitions, tmp_path):
    from sampletok.store import LocalTokenStore
    from sampletok.tokens.sif import encode_segments_with_ray, export_codes

    schema, paths = partitions
    ds = prepare(FileSource(paths), schema, tmp_path / "ds", progress=False)
    model = _small_sif(ds)
    before = export_codes(model, ds, tmp_path / "codes", progress=False, rows_per_segment=1000)
    shape = (model.tokenizer.n_tokens, 3)
    staged = LocalTokenStore.create(
        tmp_path / "codes", "p", shape, ds.schema.response_names, dtype="uint8", overwrite=True
    )
    # the first tasks write their segments, the last one reads past the dataset's end and fails
    ranges = [(0, 1000), (1000, 2000), (2000, ds.n_rows + 500)]
    with pytest.raises(Exception, match="out of bounds|IndexError"):
        encode_segments_with_ray(model, ds, staged, ranges, 256)
    after = LocalTokenStore.open(tmp_path / "codes")
    assert after.version == before.version and after.manifest["segments"] == before.manifest["segments"]
    np.testing.assert_array_equal(after.columns()["payload"], LocalTokenStore.open(before.root).columns()["payload"])


def test_ray_iat_causal_export_equals_the_local_export(cluster, partitions, tmp_path, monkeypatch):
    from sampletok.store import LocalTokenStore
    from sampletok.tokenizers.iat import IATSourceConfig
    from sampletok.tokens import iat as iat_tokens
    from sampletok.tokens.iat import build_store

    schema, paths = partitions
    ds = prepare(FileSource(paths), schema, tmp_path / "ds", progress=False)
    cfg = IATSourceConfig(scheme="user", epochs=1, hidden=[32], decompress=[16], emb_dim=8, window=8, folds=2,
                          dtype="float32")  # fmt: skip
    monkeypatch.setattr(iat_tokens, "ROWS_PER_TASK", 400)  # several tasks per fold
    local = build_store(ds, cfg, 1, tmp_path / "local", progress=False)
    remote = build_store(ds, cfg, 1, tmp_path / "ray", progress=False, engine="ray")
    a, b = LocalTokenStore.open(local.root).columns(), LocalTokenStore.open(remote.root).columns()
    for name in ("instance_id", "user", "ts", "responses", "known_at"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    np.testing.assert_allclose(a["payload"], b["payload"], rtol=1e-5, atol=1e-6)
    assert remote.meta["producer"] == local.meta["producer"]  # the same source model
