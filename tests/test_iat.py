import numpy as np
import pytest
import torch

from sampletok.data.batches import BatchLoader, TokenSource, history_index
from sampletok.errors import ConfigError
from sampletok.features import FeatureLayout
from sampletok.models import build_model
from sampletok.store import LocalTokenStore
from sampletok.tokenizers.iat import IATSourceConfig, SourceModel
from sampletok.tokens import open_tokens
from sampletok.tokens.iat import embed_all, export_to_store
from sampletok.tokens.iat_source import _train_stream_epoch, train_source, user_windows

FAST = dict(epochs=1, hidden=[64, 32], decompress=[32], emb_dim=16, window=16, batch_size=512, dtype="float32")


@pytest.fixture(scope="module")
def user_source(synth_prepared):
    return train_source(synth_prepared, IATSourceConfig(scheme="user", **FAST), seed=1, progress=False)


@pytest.fixture(scope="module")
def store(synth_prepared, user_source, tmp_path_factory):
    return export_to_store(user_source, synth_prepared, tmp_path_factory.mktemp("iat") / "store", progress=False)


def test_bottleneck_shapes_and_sit_causality(synth_prepared):
    model = SourceModel(FeatureLayout.from_dataset(synth_prepared), IATSourceConfig(scheme="user", **FAST)).eval()
    batch = BatchLoader(synth_prepared, synth_prepared.rows("train")[:40], 40).build(synth_prepared.rows("train")[:40])
    z = model.compress(batch)
    assert z.shape == (40, 16) and z.abs().max() <= 1
    seq = torch.randn(3, 10, 16)
    valid = torch.ones(3, 10, dtype=torch.bool)
    out = model.run_sit(seq, valid)
    for t in range(9):
        changed = seq.clone()
        changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
        torch.testing.assert_close(model.run_sit(changed, valid)[:, : t + 1], out[:, : t + 1])


def _sit_reference(model: SourceModel, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Causal SIT computed without any attention mask: in every layer, position k's output is the last row of the
    block run unmasked on the valid positions <= k alone (so nothing later or padded can be seen). NaN elsewhere."""
    out = torch.full_like(z, float("nan"))
    for b in range(z.shape[0]):
        pos = valid[b].nonzero().squeeze(1)
        x = z[b, pos]
        for block in model.sit:
            x = torch.stack([block(x[: k + 1].unsqueeze(0))[0, -1] for k in range(len(x))])
        out[b, pos] = x
    return out


@torch.no_grad()
def test_batch_and_streaming_sit_equal_an_unmasked_per_prefix_reference(synth_prepared):
    """Batch SIT at every valid position t, and the streaming form fed (positions < t, z_t), both equal the
    reference; padding (in front and inside the history) is ignored; later positions never change earlier ones."""
    torch.manual_seed(0)
    cfg = IATSourceConfig(scheme="user_stream", **FAST)
    model = SourceModel(FeatureLayout.from_dataset(synth_prepared), cfg).eval()
    seq = torch.randn(4, 8, 16)
    valid = torch.ones(4, 8, dtype=torch.bool)
    valid[0, :3] = False  # a short history: padding in front
    valid[1, [2, 5]] = False  # rows of the stream not yet written: holes inside the history
    ref = _sit_reference(model, seq, valid)
    batch_out = model.run_sit(seq, valid)
    torch.testing.assert_close(batch_out[valid], ref[valid], atol=1e-5, rtol=1e-5)
    for t in range(1, seq.shape[1]):
        stream = model.sit_last(seq[:, :t], valid[:, :t], seq[:, t])
        rows = valid[:, t]  # the current instance is always valid in the stream
        torch.testing.assert_close(stream[rows], ref[rows, t], atol=1e-5, rtol=1e-5)
        changed = seq.clone()
        changed[:, t:] = torch.randn_like(changed[:, t:])
        torch.testing.assert_close(model.run_sit(changed, valid)[:, :t], batch_out[:, :t])


def test_stream_training_reads_only_embeddings_written_by_earlier_steps(synth_prepared, monkeypatch):
    """In ``user_stream`` training, every previous embedding a step reads is one that an earlier step wrote for
    the same user's earlier instance (never a row of the current or a later batch), with the value written
    then; and every such row among the user's last ``stream_context`` is read."""
    cfg = IATSourceConfig(scheme="user_stream", **{**FAST, "batch_size": 256}, stream_context=8)
    ds = synth_prepared
    rows = ds.rows("train")[:2048]  # time-ordered; 8 steps
    user, ts = np.asarray(ds.col("_user_key")), np.asarray(ds.col("_ts"))
    model = SourceModel(FeatureLayout.from_dataset(ds), cfg)
    written: dict[int, np.ndarray] = {}  # row -> z of the step that computed it (what a correct stream stores)
    calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    compress, sit_last = model.compress, model.sit_last

    def record_compress(batch):
        z = compress(batch)
        calls.append((np.array(rows_of_step[len(calls)]), z.detach().numpy().copy(), None))
        return z

    def record_sit_last(prev_z, prev_mask, z):
        cur, zc, _ = calls[-1]
        calls[-1] = (cur, zc, (prev_z.numpy().copy(), prev_mask.numpy().copy()))
        return sit_last(prev_z, prev_mask, z)

    rows_of_step = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    monkeypatch.setattr(model, "compress", record_compress)
    monkeypatch.setattr(model, "sit_last", record_sit_last)
    loader = BatchLoader(ds, rows, cfg.batch_size, index=history_index(ds), layout=FeatureLayout.from_dataset(ds))
    _train_stream_epoch(model, torch.optim.Adam(model.parameters(), lr=cfg.lr), loader, ds, rows, cfg, False, 0)
    assert len(calls) == len(rows_of_step)
    n_read = 0
    for cur, z, (prev_z, prev_mask) in calls:
        for i, r in enumerate(cur):
            # independent reference: the user's last stream_context earlier rows (strictly before ts), of which
            # only those of earlier steps are in the store
            before = [q for q in rows if user[q] == user[r] and ts[q] < ts[r]]
            expected = [q for q in before[-cfg.stream_context :] if q in written]
            got = prev_z[i][prev_mask[i]]
            assert len(got) == len(expected), (r, expected)
            np.testing.assert_array_equal(got, np.stack([written[q] for q in expected]) if expected else got)
            n_read += len(expected)
        written.update(zip(cur.tolist(), z, strict=True))
    assert n_read > 100  # the check is not vacuous: later steps do read the store


def test_user_windows_are_time_sorted_runs_of_one_user():
    user = np.array([1, 0, 1, 1, 0, 1, 1])
    ts = np.array([5, 3, 1, 9, 1, 2, 7])
    w = user_windows(user, ts, np.arange(7), 3)
    assert w.tolist() == [[4, 1, -1], [2, 5, 0], [6, 3, -1]]


@pytest.mark.parametrize("scheme", ["temporal", "user_stream"])
def test_other_schemes_train(synth_prepared, scheme):
    m = train_source(synth_prepared, IATSourceConfig(scheme=scheme, **FAST), seed=0, progress=False)
    assert np.isfinite(embed_all(m, synth_prepared, progress=False)).all()


def test_export_store_fetch_round_trip_equals_model_output(synth_prepared, user_source, store):
    rows = synth_prepared.rows("test")[:64]
    user, ts = np.asarray(synth_prepared.col("_user_key")), np.asarray(synth_prepared.col("_ts"))
    f = store.fetch(user[rows], ts[rows], 20)
    assert f.mask.any()
    iid = np.asarray(synth_prepared.col("_instance_id"))
    row_of_iid = {v: i for i, v in enumerate(iid)}
    stored_rows = np.array([row_of_iid[v] for v in np.asarray(store.columns()["instance_id"])[f.seq[f.mask]]])
    with torch.no_grad():
        direct = user_source.compress(BatchLoader(synth_prepared, stored_rows, 4096).build(stored_rows)).numpy()
    np.testing.assert_allclose(f.payload[f.mask], direct, atol=1e-5)
    assert store.meta["producer"] and store.meta["kind"] == "iat"


def test_iat_model_cannot_see_the_future(synth_prepared, store, tmp_path):
    """Rewriting every stored instance at or after a request's time leaves that request's score unchanged."""
    layout = FeatureLayout.from_dataset(synth_prepared)
    model = build_model("iat", layout, source=dict(scheme="user", **FAST), store=str(store.root), token_len=20).eval()
    tokens = open_tokens(model, synth_prepared, seed=1, hist_len=50)
    users = np.asarray(synth_prepared.col("_user_key"))
    valid_rows = synth_prepared.rows("valid")
    _, first = np.unique(users[valid_rows], return_index=True)
    rows = valid_rows[first][:128]  # one request per user, so "the future" is well defined per user
    batch = BatchLoader(synth_prepared, rows, 128, tokens=tokens).build(rows)
    with torch.no_grad():
        before = model(batch).logits
    # a copy of the store whose instances at/after their user's request time carry garbage payload and labels
    c = store.columns()
    request_ts = dict(zip(users[rows].tolist(), batch.ts.tolist(), strict=True))
    payload = np.array(c["payload"], dtype=np.float32)
    responses = np.array(c["responses"])
    limit = np.array([request_ts.get(u, np.iinfo(np.int64).max) for u in np.asarray(c["user"]).tolist()])
    future = np.asarray(c["ts"]) >= limit
    assert future.any()
    payload[future] = 99.0
    responses[future] = 1 - responses[future]
    forged = LocalTokenStore.create(
        tmp_path / "forged",
        producer=store.meta["producer"],
        payload_shape=(16,),
        response_names=store.meta["responses"],
        dtype="float32",
        extra_meta={k: store.meta[k] for k in ("kind", "dataset")},
    )
    forged.append(c["instance_id"], c["user"], c["ts"], payload, responses, c["known_at"])
    forged.commit()
    forged_tokens = TokenSource(forged.load_into_memory(), 20)
    with torch.no_grad():
        after = model(BatchLoader(synth_prepared, rows, 128, tokens=forged_tokens).build(rows)).logits
    torch.testing.assert_close(before, after)


@pytest.mark.parametrize(
    "params",
    [
        dict(base="din"),
        dict(base="bst", seq_model="din", query="id"),
        dict(base="rankmixer", placement="after", side_info=False),
    ],
)
def test_iat_forward_backward_on_bases(synth_prepared, store, params):
    layout = FeatureLayout.from_dataset(synth_prepared)
    model = build_model(
        "iat", layout, source=dict(scheme="user", **FAST), store=str(store.root), token_len=10, **params
    )
    tokens = open_tokens(model, synth_prepared, seed=1, hist_len=50)
    rows = synth_prepared.rows("train")[:64]
    batch = BatchLoader(synth_prepared, rows, 64, tokens=tokens).build(rows)
    snapshot = np.array(store.columns()["payload"]).copy()
    out = model(batch)
    assert out.logits.shape == (64, 1) and torch.isfinite(out.logits).all()
    out.logits.sum().backward()
    assert model.adapt[0].weight.grad is not None and model.adapt[0].weight.grad.abs().sum() > 0
    assert tokens is not None
    np.testing.assert_array_equal(np.asarray(tokens.store.columns()["payload"]), snapshot)  # tokens are frozen


def test_store_from_another_dataset_is_refused(synth_prepared, toy_prepared, store):
    layout = FeatureLayout.from_dataset(toy_prepared)
    model = build_model("iat", layout, store=str(store.root), source=dict(scheme="user", **FAST))
    with pytest.raises(ConfigError, match="exported for dataset"):
        open_tokens(model, toy_prepared, seed=0, hist_len=4)


def _one_request(loader: BatchLoader, rows: np.ndarray):
    """A served request's batch: the history (and tokens) of rows[-1] for every row, the rows' own features."""
    batch = loader.build(np.repeat(rows[-1:], len(rows)))
    own = loader.build(rows)
    batch.cat, batch.multi, batch.num = own.cat, own.multi, own.num
    return batch


@pytest.mark.parametrize("params", [dict(base="din"), dict(base="din", seq_model="din", encoder_layers=1)])
def test_a_shared_history_is_computed_once_with_the_same_scores(synth_prepared, store, params):
    """The serving path (``Batch.history_group``: the token pass and the item-ID history embedding run once
    and broadcast) scores exactly as the plain per-row path."""
    torch.manual_seed(0)
    layout = FeatureLayout.from_dataset(synth_prepared)
    model = build_model(
        "iat", layout, source=dict(scheme="user", **FAST), store=str(store.root), token_len=10, **params
    )
    model.eval()
    tokens = open_tokens(model, synth_prepared, seed=1, hist_len=50)
    rows = synth_prepared.rows("test")[:8]
    batch = _one_request(BatchLoader(synth_prepared, rows, 64, hist_len=20, tokens=tokens), rows)
    assert batch.tokens is not None and batch.tokens.mask.any() and batch.hist_mask.any()
    with torch.no_grad():
        plain = model(batch).logits
        batch.history_group = torch.zeros(len(batch), dtype=torch.int64)
        shared = model(batch).logits
    torch.testing.assert_close(shared, plain)
    assert plain.std() > 0


@pytest.mark.parametrize("scheme", ["user", "temporal"])
def test_source_quality_measures_the_source_model_on_the_validation_split(synth_prepared, scheme, tmp_path):
    """What IAT's report prints: the source model's own validation AUC. A trained source model predicts the
    synthetic log's clicks; its untrained start does not; the measure reads validation rows only."""
    from sampletok.tokens.iat import build_store
    from sampletok.tokens.iat_source import source_quality

    ds = synth_prepared
    cfg = IATSourceConfig(scheme=scheme, epochs=6, hidden=[32], emb_dim=8, folds=2, window=16, batch_size=256)
    valid = ds.rows("valid")
    torch.manual_seed(0)
    untrained = source_quality(SourceModel(FeatureLayout.from_dataset(ds), cfg), ds, valid)
    trained = source_quality(train_source(ds, cfg, seed=0, progress=False), ds, valid)
    assert trained["rows"] == untrained["rows"] == len(valid)
    assert trained["auc"] > max(untrained["auc"], 0.55)  # (its LogLoss need not fall: 2 epochs, uncalibrated)
    meta = build_store(ds, cfg, 0, tmp_path / "tokens", progress=False).meta["source_valid"]
    assert meta["rows"] == len(valid) and 0.5 < meta["auc"] < 1.0
