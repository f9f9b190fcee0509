"""`prepare --append`: new rows of a log added to a prepared dataset with its fitted vocabularies."""

import json
import shutil

import numpy as np
import polars as pl
import pytest

from sampletok.data.batches import history_index
from sampletok.data.dataset import PreparedDataset, SplitSpec
from sampletok.data.prepare import append, prepare
from sampletok.data.sources.files import FrameSource
from sampletok.data.sources.synthetic import SyntheticConfig, generate_source
from sampletok.errors import DataError

CFG = SyntheticConfig(n_users=120, n_items=400, events_per_user=30, n_fields=18, days=30, seed=5)


@pytest.fixture(scope="module")
def log():
    """The log cut at one time into the rows prepared first and a later day of rows (with new users and items)."""
    src, schema = generate_source(CFG)
    frame = src.to_frame()
    ts = frame.get_column("ts").to_numpy()
    day = np.quantile(ts, 0.85)
    old, new = frame.filter(pl.col("ts") < day), frame.filter(pl.col("ts") >= day)
    cut = (int(np.quantile(ts, 0.6)), int(np.quantile(ts, 0.75)))  # valid / test start, both before `day`
    return schema, old, new, SplitSpec(cut_ts=cut)


def _prepared(tmp_path, name, schema, frame, split):
    return prepare(FrameSource(frame, name="old.csv"), schema, tmp_path / name, split, progress=False)


def test_append_equals_preparing_old_and_new_rows_with_frozen_vocabularies(log, tmp_path):
    schema, old, new, split = log
    target = _prepared(tmp_path, "target", schema, old, split)
    frozen = _prepared(tmp_path, "frozen", schema, old, split)
    grown = append(target.root, FrameSource(new, name="day.csv"), progress=False)
    scratch = prepare(
        FrameSource(pl.concat([old, new]), name="all.csv"), schema, tmp_path / "scratch", progress=False, frozen=frozen
    )
    assert grown.n_rows == len(old) + len(new) == scratch.n_rows
    assert set(grown.manifest["columns"]) == set(scratch.manifest["columns"])
    for name in scratch.manifest["columns"]:
        np.testing.assert_array_equal(grown.col(name), scratch.col(name), err_msg=name)
    assert grown.manifest["split_rows"] == scratch.manifest["split_rows"]
    assert grown.manifest["fields"] == frozen.manifest["fields"]  # vocabularies and normalizations kept
    assert grown.manifest["appended"][0] | {"at": None, "seconds": None} == {
        "source": "day.csv",
        "first_row": len(old),
        "rows": len(new),
        "skipped_known_instances": 0,
        "duplicates": grown.manifest["appended"][0]["duplicates"],
        "at": None,
        "seconds": None,
    }
    # the old rows are untouched, the new ones are all later and land in the test split
    for name in frozen.manifest["columns"]:
        np.testing.assert_array_equal(grown.col(name)[: len(old)], frozen.col(name), err_msg=name)
    assert (np.asarray(grown.col("_split"))[len(old) :] == 2).all()
    # values never seen in the training window are OOV, as at serving
    item_vocab = frozen.stats["item_id"].vocab
    unseen = ~new.get_column("item_id").cast(pl.Utf8).is_in(item_vocab).to_numpy()
    assert unseen.any()
    oov = frozen.vocab_size("item_id") - 1
    assert (np.asarray(grown.col("cat__item_id"))[len(old) :][unseen] == oov).all()
    # the history index grows: a new row sees the user's old rows before it
    index = history_index(grown)
    assert index is not None and grown.n_rows > frozen.n_rows


def test_append_twice_and_the_same_rows_again(log, tmp_path):
    schema, old, new, split = log
    half = new.height // 2
    target = _prepared(tmp_path, "twice", schema, old, split)
    append(target.root, FrameSource(new[:half], name="a.csv"), progress=False)
    grown = append(target.root, FrameSource(new[half:], name="b.csv"), progress=False)
    once = append(_prepared(tmp_path, "once", schema, old, split).root, FrameSource(new, name="ab.csv"), progress=False)
    for name in once.manifest["columns"]:
        np.testing.assert_array_equal(grown.col(name), once.col(name), err_msg=name)
    assert [a["source"] for a in grown.manifest["appended"]] == ["a.csv", "b.csv"]
    # the same rows again: an error naming the file, column and row (duplicates: error, the default)
    with pytest.raises(DataError) as e:
        append(target.root, FrameSource(new[half:], name="b-again.csv"), progress=False)
    msg = str(e.value)
    assert "b-again.csv" in msg and "already in the prepared dataset" in msg and "\n" not in msg
    assert PreparedDataset(target.root).n_rows == grown.n_rows
    # a dataset with appended rows is never replaced by a plain prepare of the old log (without force)
    with pytest.raises(DataError, match="holds rows appended"):
        _prepared(tmp_path, "twice", schema, old, split)


def test_a_failed_append_leaves_the_dataset_readable(log, tmp_path, monkeypatch):
    import sampletok.data.prepare as prep

    schema, old, new, split = log
    target = _prepared(tmp_path, "crash", schema, old, split)
    before = json.loads((target.root / "manifest.json").read_text())

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-append")

    monkeypatch.setattr(prep, "_encode_rows", crash)
    with pytest.raises(RuntimeError):
        append(target.root, FrameSource(new, name="day.csv"), progress=False)
    after = PreparedDataset(target.root)
    assert after.manifest == before and after.n_rows == len(old)
    assert len(np.asarray(after.col("_ts"))) == len(old)
    left = [p.name for p in target.root.parent.iterdir() if p.name.startswith(".") and p.suffix != ".lock"]
    assert not left  # no temporary left


def test_append_refuses_a_log_with_other_columns(log, tmp_path):
    schema, old, new, split = log
    target = _prepared(tmp_path, "cols", schema, old, split)
    with pytest.raises(DataError, match="missing columns"):
        append(target.root, FrameSource(new.drop("item_id"), name="bad.csv"), progress=False)
    shutil.rmtree(target.root)


def test_rows_already_in_the_dataset_are_skipped_under_keep_first(log, tmp_path):
    schema, old, new, split = log
    schema = schema.model_copy(update={"duplicates": "keep_first"})
    target = _prepared(tmp_path, "keep", schema, old, split)
    grown = append(target.root, FrameSource(pl.concat([old[:50], new]), name="overlap.csv"), progress=False)
    assert grown.n_rows == len(old) + len(new)
    assert grown.manifest["appended"][0]["skipped_known_instances"] == 50
    assert len(np.unique(np.asarray(grown.col("_instance_id")))) == grown.n_rows


def test_cli_prepare_append(log, tmp_path):
    from tests.test_cli import _cli

    schema, old, new, _ = log
    schema.to_yaml(tmp_path / "schema.yaml")
    old.write_parquet(tmp_path / "old.parquet")
    new.write_parquet(tmp_path / "day.parquet")
    out = tmp_path / "ds"
    r = _cli("prepare", "--files", str(tmp_path / "old.parquet"), "--schema", str(tmp_path / "schema.yaml"),
             "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("prepare", "--append", str(tmp_path / "day.parquet"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"appended {len(new):,} rows" in " ".join(r.stdout.split())
    assert PreparedDataset(out).n_rows == len(old) + len(new)
    r = _cli("prepare", "--append", str(tmp_path / "day.parquet"), "--out", str(out))  # the same day again
    assert r.returncode == 2 and "already in the prepared dataset" in r.stderr and "Traceback" not in r.stderr


def test_sif_code_export_appends_only_the_new_rows(log, tmp_path, monkeypatch):
    import torch

    from sampletok.features import FeatureLayout
    from sampletok.models import build_model
    from sampletok.store import LocalTokenStore
    from sampletok.tokenizers.hgaq import SampleTokenizer
    from sampletok.tokens.sif import export_codes

    schema, old, new, split = log
    ds = _prepared(tmp_path, "codes-ds", schema, old, split)
    torch.manual_seed(0)
    model = build_model("sif", FeatureLayout.from_dataset(ds), hgaq={"fields_per_token": 4, "codes": 32}, width=16,
                        blocks=1, heads=2).eval()  # fmt: skip
    export_codes(model, ds, tmp_path / "codes", progress=False)
    grown = append(ds.root, FrameSource(new, name="day.csv"), progress=False)
    encoded: list[int] = []
    real = SampleTokenizer.encode
    monkeypatch.setattr(SampleTokenizer, "encode", lambda self, b, k=None: encoded.append(len(b)) or real(self, b, k))
    store = export_codes(model, grown, tmp_path / "codes", progress=False, append=True)
    assert sum(encoded) == len(new)  # only the new rows were encoded
    full = export_codes(model, grown, tmp_path / "codes-full", progress=False)
    a, b = LocalTokenStore.open(store.root).columns(), full.columns()
    for name in ("instance_id", "user", "ts", "payload", "responses", "known_at"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert store.meta["dataset"] == grown.fingerprint and store.meta["rows_reused"] == len(old)
    other = build_model("sif", FeatureLayout.from_dataset(ds), hgaq={"fields_per_token": 4, "codes": 32}, width=16,
                        blocks=1, heads=2)  # fmt: skip
    with pytest.raises(Exception, match="not codes of this model's codebooks"):
        export_codes(other, grown, tmp_path / "codes", progress=False, append=True)


def test_iat_tokens_of_the_new_rows_are_appended_as_a_rebuild_would_write_them(log, tmp_path, monkeypatch):
    from sampletok.store import LocalTokenStore
    from sampletok.tokenizers.iat import IATSourceConfig, SourceModel
    from sampletok.tokens.iat import append_tokens, build_store

    schema, old, new, split = log
    ds = _prepared(tmp_path, "iat-ds", schema, old, split)
    cfg = IATSourceConfig(
        scheme="user", epochs=1, hidden=[32], decompress=[16], emb_dim=8, window=8, batch_size=256, folds=3,
        dtype="float32",
    )  # fmt: skip
    before = build_store(ds, cfg, 1, tmp_path / "tokens", progress=False)
    grown = append(ds.root, FrameSource(new, name="day.csv"), progress=False)
    embedded: list[int] = []
    real = SourceModel.compress
    monkeypatch.setattr(SourceModel, "compress", lambda self, b: embedded.append(len(b)) or real(self, b))
    store = append_tokens(tmp_path / "tokens", grown, progress=False)
    monkeypatch.undo()
    assert sum(embedded) == len(new)  # only the new rows were embedded
    assert store.version == before.version + 1 and len(store) == len(old) + len(new)
    rebuilt = build_store(grown, cfg, 1, tmp_path / "rebuilt", progress=False)
    a, b = store.columns(), LocalTokenStore.open(rebuilt.root).columns()
    for name in ("instance_id", "user", "ts", "responses", "known_at"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    np.testing.assert_allclose(a["payload"], b["payload"], rtol=0, atol=1e-6)
    assert len(append_tokens(tmp_path / "tokens", grown, progress=False)) == len(store)  # nothing new: unchanged
    # a model reading the grown store on the grown dataset accepts it
    from sampletok.features import FeatureLayout
    from sampletok.models import build_model
    from sampletok.tokens import open_tokens

    iat = build_model("iat", FeatureLayout.from_dataset(grown), store=str(tmp_path / "tokens"), token_len=8,
                      source=cfg.model_dump())  # fmt: skip
    tokens = open_tokens(iat, grown, seed=1, hist_len=5)
    assert tokens is not None and len(tokens.store) == len(old) + len(new)


def test_iat_append_refuses_new_rows_inside_the_training_window(log, tmp_path):
    from sampletok.errors import StoreError
    from sampletok.tokenizers.iat import IATSourceConfig
    from sampletok.tokens.iat import append_tokens, build_store

    schema, old, new, split = log
    held = (pl.col(schema.user) == old.get_column(schema.user)[0]) & (pl.col("ts") < split.cut_ts[0])
    ds = _prepared(tmp_path, "iat-ds", schema, old.filter(~held), split)  # one user's training rows arrive late
    cfg = IATSourceConfig(scheme="user", epochs=1, hidden=[32], decompress=[16], emb_dim=8, window=8, folds=2)
    build_store(ds, cfg, 1, tmp_path / "tokens", progress=False)
    grown = append(ds.root, FrameSource(old.filter(held), name="late-arrivals.csv"), progress=False)
    with pytest.raises(StoreError, match="inside the training window"):
        append_tokens(tmp_path / "tokens", grown, progress=False)


def test_iat_append_refuses_new_rows_earlier_than_stored_rows_of_their_user(log, tmp_path):
    """A late-arriving row after the training window, but before rows of its user already exported, would be
    in those rows' history: a rebuild would change their tokens, so the append is refused."""
    from sampletok.errors import StoreError
    from sampletok.tokenizers.iat import IATSourceConfig
    from sampletok.tokens.iat import append_tokens, build_store

    schema, old, new, split = log
    after = old.filter(pl.col("ts") >= split.cut_ts[1])  # the test period of the old rows
    counts = after.group_by(schema.user).len().filter(pl.col("len") >= 2)
    user = counts.get_column(schema.user)[0]
    first = after.filter(pl.col(schema.user) == user).sort("ts").head(1)
    late = (pl.col(schema.user) == user) & (pl.col("ts") == first.get_column("ts")[0])
    ds = _prepared(tmp_path, "iat-ds", schema, old.filter(~late), split)
    cfg = IATSourceConfig(scheme="user", epochs=1, hidden=[32], decompress=[16], emb_dim=8, window=8, folds=2)
    build_store(ds, cfg, 1, tmp_path / "tokens", progress=False)
    grown = append(ds.root, FrameSource(old.filter(late), name="late-arrivals.csv"), progress=False)
    with pytest.raises(StoreError, match="earlier than rows of its user"):
        append_tokens(tmp_path / "tokens", grown, progress=False)
