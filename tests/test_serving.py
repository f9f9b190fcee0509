"""The online path: the service's scores equal offline ``evaluate`` on ml-100k's test rows (DIN, DIN + IAT,
SIF; local and Redis stores); streamed events rebuild exactly the offline stores (IAT tokens included); an
event is visible only after its time and each response only once known; bad requests get one-line 4xx
errors; unknown users and values score through OOV; /healthz, /metrics and the `serve` command work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest

from sampletok.data.cells import user_keys
from sampletok.data.prepare import prepare
from sampletok.errors import DataError
from sampletok.serving.config import ServingConfig
from sampletok.serving.events import EventCodec, export_events
from sampletok.serving.scorer import ScoreQuery, Scorer, store_location
from sampletok.store import open_store
from sampletok.train.experiment import ModelSpec, load_trained, run_model
from sampletok.train.trainer import TrainConfig, predict

fastapi = pytest.importorskip("fastapi", reason="the serve extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from sampletok.serving.app import create_app  # noqa: E402

TRAIN = TrainConfig(max_epochs=1, hist_len=20, batch_size=1024, train_recent_fraction=0.1, calibrate=True)
MODELS = {
    "din": {"history_responses": True},
    "iat": {
        "base": "din",
        "token_len": 30,
        "token_dim": 16,
        "side_dim": 8,
        "encoder_layers": 0,
        "source": {"scheme": "user", "epochs": 1, "hidden": [64], "folds": 2},
    },
    "sif": {"hgaq": {"fields_per_token": 4, "codes": 64}, "width": 16, "blocks": 1, "heads": 2, "isolate_target": True},
}


@pytest.fixture(scope="module")
def ml(ml100k_dir, tmp_path_factory):
    from sampletok.data.sources.movielens import load_movielens

    source, schema = load_movielens(ml100k_dir)
    root = tmp_path_factory.mktemp("serve")
    ds = prepare(source, schema, root / "ds", progress=False).load_into_memory()
    return source.frame, schema, ds, root


@pytest.fixture(scope="module")
def runs(ml):
    _, _, ds, root = ml
    out = {}
    for name, params in MODELS.items():
        if name == "iat":
            params = {**params, "cache_dir": str(root / "iat-cache")}
        run_model(ds, ModelSpec(name=name, params=params), TRAIN, 2021, run_dir=root / name, progress=False)
        out[name] = root / name
    return out


def _requests(frame: pl.DataFrame, schema, rows: np.ndarray) -> list[tuple[np.ndarray, dict]]:
    """Test rows as served requests: the rows of one user at one time are one request's candidates."""
    sub = frame[rows.tolist()].with_columns(_row=pl.Series(rows))
    features = [f.name for f in schema.features if f.name != schema.user]
    out = []
    for (user, ts), g in sub.group_by([schema.user, schema.timestamp], maintain_order=True):
        body = {"user": user, "ts": int(ts), "context": {}, "candidates": g.select(features).to_dicts()}
        out.append((g["_row"].to_numpy(), body))
    return out


def _offline(ds, run, rows):
    trained = load_trained(ds, run)
    p, _, _ = predict(trained.model, trained.loader(ds, rows))
    return p


def _served(client, frame, schema, rows):
    got = np.full(len(rows), np.nan)
    pos = {r: i for i, r in enumerate(rows)}
    for req_rows, body in _requests(frame, schema, rows):
        r = client.post("/score", json=body)
        assert r.status_code == 200, r.text
        got[[pos[x] for x in req_rows]] = r.json()["scores"]
    return got


@pytest.mark.parametrize("name", list(MODELS))
def test_service_scores_equal_offline_evaluate(name, ml, runs, tmp_path):
    frame, schema, ds, _ = ml
    rows = ds.rows("test")[::25]  # 400 test rows across the split, several candidates per request
    want = _offline(ds, runs[name], rows)
    client = TestClient(create_app(Scorer.from_run(ds, runs[name], tmp_path / "store")))
    got = _served(client, frame, schema, rows)
    assert np.abs(got - want).max() < 1e-5
    assert np.std(want) > 0.01  # the model does rank


def _offline_one_request(ds, run, row: int, cand_rows: np.ndarray) -> np.ndarray:
    """Offline scores of one request: row's user, time, history and non-item fields, with each candidate row's
    item fields (the batch the trained loader builds, its item columns swapped)."""
    import torch

    trained = load_trained(ds, run)
    loader = trained.loader(ds, cand_rows)
    batch = loader.build(np.repeat([row], len(cand_rows)))
    cands = loader.build(cand_rows)
    lay = loader.layout
    for name, fields in (("cat", lay.cat_fields), ("multi", lay.multi_fields), ("num", lay.num_fields)):
        item = torch.tensor([f.group == "item" for f in fields])
        mine, theirs = getattr(batch, name), getattr(cands, name)
        shape = (1, len(fields)) + (1,) * (mine.dim() - 2)
        setattr(batch, name, torch.where(item.view(shape), theirs, mine))
    model = trained.model.eval()
    with torch.no_grad():
        z = model(batch).logits[:, 0].double().numpy()
    a, b = (float(v) for v in model.calibration)
    return 1.0 / (1.0 + np.exp(-(a * z + b)))


@pytest.mark.parametrize("name", list(MODELS))
def test_many_candidates_of_one_request_score_as_offline(name, ml, runs, tmp_path):
    """One history, 40 candidates: the shared-history paths (one fetch, one history pass) score each candidate
    as the plain offline batch does."""
    frame, schema, ds, _ = ml
    test = ds.rows("test")
    row, cand_rows = int(test[-1]), test[:40]
    want = _offline_one_request(ds, runs[name], row, cand_rows)
    r = frame.row(row, named=True)
    item = [f.name for f in schema.features if f.group == "item"]
    context = {f.name: r[f.name] for f in schema.features if f.group != "item" and f.name != schema.user}
    body = {"user": r[schema.user], "ts": int(r[schema.timestamp]), "context": context}
    body["candidates"] = frame[cand_rows.tolist()].select(item).to_dicts()
    client = TestClient(create_app(Scorer.from_run(ds, runs[name], tmp_path / "store")))
    reply = client.post("/score", json=body).json()
    assert reply["history"]["events"] > 0
    assert np.abs(np.array(reply["scores"]) - want).max() < 1e-5
    assert np.ptp(want) > 1e-4  # the candidates score apart by far more than the tolerance


@pytest.mark.parametrize("name", ["iat", "sif"])
def test_service_on_redis_scores_as_offline(name, ml, runs, redis_url):
    frame, schema, ds, _ = ml
    rows = ds.rows("test")[::97]
    want = _offline(ds, runs[name], rows)
    store = f"{redis_url}?store=t-{name}"
    client = TestClient(create_app(Scorer.from_run(ds, runs[name], store, reset=True)))
    assert np.abs(_served(client, frame, schema, rows) - want).max() < 1e-5
    assert open_store(store_location(store, "events")).meta["kind"] == "events"


def _event(frame, schema, row: int) -> dict:
    r = frame.row(row, named=True)
    features = [f.name for f in schema.features if f.name != schema.user]
    return {
        "user": r[schema.user],
        "ts": int(r[schema.timestamp]),
        "fields": {f: r[f] for f in features},
        "responses": {n: r[n] for n in schema.response_names},
    }


def test_streamed_events_rebuild_the_offline_stores(ml, runs, tmp_path):
    """Replaying the log after the training window as /events gives the event store a full export gives, and
    IAT tokens equal to the offline export's (those rows are embedded by the final source model offline)."""
    frame, schema, ds, _ = ml
    ts = np.asarray(ds.col("_ts"))
    cutoff = int(ts[ds.rows("valid")].min())
    user = np.asarray(ds.col("_user_key"))
    later = np.flatnonzero(ts >= cutoff)
    users = np.unique(user[later])[:4]
    replay = later[np.isin(user[later], users)]
    replay = replay[np.argsort(ts[replay], kind="stable")]
    assert len(replay) > 20
    scorer = Scorer.from_run(ds, runs["iat"], tmp_path / "store", before_ts=cutoff)
    client = TestClient(create_app(scorer))
    before = scorer.events.fetch(users, np.full(len(users), ts.max() + 1), 500, dequantize=False)
    for row in replay:
        r = client.post("/events", json=_event(frame, schema, int(row)))
        assert r.status_code == 200, r.text
    full = export_events(ds, tmp_path / "full-events")
    at = np.full(len(users), ts.max() + 1)
    got, want = scorer.events.fetch(users, at, 500, dequantize=False), full.fetch(users, at, 500, dequantize=False)
    assert got.mask.sum() == want.mask.sum() == before.mask.sum() + len(replay)
    for part in ("payload", "responses", "response_mask", "mask", "gap"):
        np.testing.assert_array_equal(getattr(got, part), getattr(want, part), err_msg=part)
    offline = load_trained(ds, runs["iat"]).tokens
    assert offline is not None and scorer.tokens is not None
    a, b = scorer.tokens.fetch(users, at), offline.fetch(users, at)
    np.testing.assert_array_equal(a.mask.numpy(), b.mask.numpy())
    np.testing.assert_allclose(a.payload.numpy(), b.payload.numpy(), atol=2e-3)  # float16 storage
    np.testing.assert_array_equal(a.responses.numpy(), b.responses.numpy())
    # and a request after the replay scores as offline again
    rows = replay[-3:]
    want_p = _offline(ds, runs["iat"], rows)
    assert np.abs(_served(client, frame, schema, rows) - want_p).max() < 1e-5


def test_an_event_is_visible_after_its_time_and_responses_once_known(toy_prepared, tmp_path):
    ds = toy_prepared.load_into_memory()
    run_model(
        ds, ModelSpec(name="din", params={"history_responses": True}), TRAIN, 1, run_dir=tmp_path / "r", progress=False
    )
    client = TestClient(create_app(Scorer.from_run(ds, tmp_path / "r", tmp_path / "store")))
    fields = {"iid": 3, "tags": ["1", "2"], "price": 9.5, "pop": 0.3}
    body = {"user": "new-user", "ts": 1000, "fields": fields, "responses": {"click": 1, "buy": 1}}
    assert client.post("/events", json=body).status_code == 200
    body = {"user": "new-user", "ts": 1001, "fields": fields, "responses": {"buy": 1}}  # click not known
    assert client.post("/events", json=body).status_code == 200
    key = int(user_keys(pl.Series(["new-user"]))[0])
    events = open_store(store_location(tmp_path / "store", "events"))  # a reader opened after the appends

    def seen(at: int):
        f = events.fetch(np.array([key]), np.array([at]), 4, dequantize=False)
        return int(f.mask.sum()), f.response_mask[0, f.mask[0]].tolist()

    names = ds.schema.response_names  # click (delay 0), buy (delay 5 s)
    assert names == ["click", "buy"]
    assert seen(1000) == (0, [])  # strict: never at its own time
    assert seen(1001) == (1, [[True, False]])  # buy known only 5 s later
    assert seen(1006) == (2, [[True, True], [False, False]])
    assert seen(1007) == (2, [[True, True], [False, True]])  # a response not given is never visible
    req = {"user": "new-user", "candidates": [{k: v for k, v in fields.items()}]}
    s_before = client.post("/score", json={**req, "ts": 1000}).json()["scores"]
    s_after = client.post("/score", json={**req, "ts": 1007}).json()["scores"]
    assert s_before != s_after


def test_bad_requests_get_one_line_4xx_errors(ml, runs, tmp_path):
    frame, schema, ds, _ = ml
    scorer = Scorer.from_run(ds, runs["din"], tmp_path / "store", max_candidates=5)
    client = TestClient(create_app(scorer), raise_server_exceptions=False)
    good = _requests(frame, schema, ds.rows("test")[:1])[0][1]
    cand = good["candidates"][0]
    cases = {
        "unknown field": {**good, "candidates": [{**cand, "colour": "red"}]},
        "unknown request key": {**good, "extra": 1},
        "wrong type": {**good, "ts": "yesterday"},
        "candidates not a list": {**good, "candidates": {"item_id": 1}},
        "no candidates": {**good, "candidates": []},
        "missing user": {k: v for k, v in good.items() if k != "user"},
        "empty user": {**good, "user": " "},
        "too many candidates": {**good, "candidates": [cand] * 6},
        "missing field": {**good, "candidates": [{k: v for k, v in cand.items() if k != "age"}]},
        "bad value": {**good, "candidates": [{**cand, "age": "old"}]},
        "user as a field": {**good, "context": {schema.user: 3}},
        "a response as a field": {**good, "candidates": [{**cand, "rating": 5}]},
        "a list for a categorical": {**good, "candidates": [{**cand, "item_id": [3]}]},
        "an object for a value": {**good, "candidates": [{**cand, "age": {"years": 30}}]},
        "a field missing from one candidate": {
            **good,
            "candidates": [cand, {k: v for k, v in cand.items() if k != "item_id"}],
        },
        "huge ts": {**good, "ts": 10**30},
        "boolean user": {**good, "user": True},
    }
    for what, body in cases.items():
        r = client.post("/score", json=body)
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        err = r.json()["error"]
        assert "\n" not in err and "Traceback" not in err and err, what
    r = client.post("/score", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "\n" not in r.json()["error"]
    r = client.post("/events", json={"user": 1, "ts": 5, "fields": {}, "responses": {"stars": 1}})
    assert r.status_code == 400 and "stars" in r.json()["error"]
    event = {"user": 1, "ts": 5, "fields": {k: v for k, v in cand.items()} | good["context"]}
    for bad in ({"responses": {"click": [1]}}, {"fields": {**event["fields"], "click": 1}}, {"ts": -(10**30)}):
        r = client.post("/events", json={**event, **bad})
        assert 400 <= r.status_code < 500 and "\n" not in r.json()["error"], (bad, r.text)
    assert "age" in client.post("/score", json=cases["bad value"]).json()["error"]


def test_unknown_users_and_values_score_through_oov(ml, runs, tmp_path):
    frame, schema, ds, _ = ml
    client = TestClient(create_app(Scorer.from_run(ds, runs["sif"], tmp_path / "store")))
    good = _requests(frame, schema, ds.rows("test")[:1])[0][1]
    cand = {**good["candidates"][0], "item_id": "never-seen", "genres": ["NoSuchGenre"]}
    body = {**good, "user": "a-new-user", "candidates": [cand, good["candidates"][0]]}
    r = client.post("/score", json=body)
    assert r.status_code == 200, r.text
    assert all(0 < s < 1 for s in r.json()["scores"])
    assert r.json()["history"]["events"] == 0  # a user never seen: no history, the user-ID code is OOV
    scorer = Scorer.from_run(ds, runs["sif"], tmp_path / "store")
    batch = scorer.batch(body["user"], body["ts"], body["context"], body["candidates"])
    lay = scorer.layout
    pos = {f.name: i for i, f in enumerate(lay.cat_fields)}
    assert batch.cat[0, pos["item_id"]] == lay.vocab_sizes["item_id"] - 1  # OOV
    assert batch.cat[0, pos["user_id"]] == lay.vocab_sizes["user_id"] - 1
    assert batch.cat[1, pos["item_id"]] not in (0, lay.vocab_sizes["item_id"] - 1)


def test_healthz_and_metrics(ml, runs, tmp_path):
    from sampletok.store.redis import local_redis_server

    frame, schema, ds, _ = ml
    with local_redis_server(tmp_path) as url:
        client = TestClient(create_app(Scorer.from_run(ds, runs["din"], url)))
        health = client.get("/healthz").json()
        # auto batching timed the model at start on a 100-candidate probe: a whole number of probe requests
        assert health["status"] == "ok" and health["max_batch_candidates"] in (100, 200, 400, 800)
        body = _requests(frame, schema, ds.rows("test")[:3])[0][1]
        for _ in range(3):
            assert client.post("/score", json=body).status_code == 200
        client.post("/score", json={**body, "candidates": []})
        text = client.get("/metrics").text
        assert 'sampletok_requests_total{endpoint="/score",status="200"} 3.0' in text
        assert 'sampletok_requests_total{endpoint="/score",status="422"} 1.0' in text
        assert 'sampletok_request_seconds_count{endpoint="/score"} 4.0' in text
        assert "sampletok_store_fetch_seconds_count 3.0" in text
        assert f"sampletok_max_batch_candidates {float(health['max_batch_candidates'])}" in text
    # the server is gone: health and scoring say so in one line, as 503
    r = client.get("/healthz")
    assert r.status_code == 503 and ("cannot" in r.json()["error"] or "failed" in r.json()["error"])
    assert client.post("/score", json=body).status_code == 503


def test_the_same_log_gets_the_same_user_keys(ml, tmp_path):
    frame, schema, ds, _ = ml
    from sampletok.data.sources import FrameSource

    again = prepare(FrameSource(frame[::-1], "reversed"), schema, tmp_path / "again", progress=False)
    a = dict(zip(frame[schema.user].to_list(), np.asarray(ds.col("_user_key")).tolist(), strict=True))
    b = dict(zip(frame[::-1][schema.user].to_list(), np.asarray(again.col("_user_key")).tolist(), strict=True))
    assert a == b
    assert a[frame[schema.user][0]] == int(user_keys(pl.Series([str(frame[schema.user][0])]))[0])
    with pytest.raises(DataError, match="missing user"):
        Scorer.user_key(None)


def test_event_codec_round_trips_every_row(ml):
    _, _, ds, _ = ml
    from sampletok.features import FeatureLayout

    codec = EventCodec(FeatureLayout.from_dataset(ds))
    rows = np.arange(ds.n_rows)
    cols = codec.columns_of(ds, rows)
    cat, multi, num = codec.unpack(codec.pack(cols))
    lay = codec.layout
    for i, f in enumerate(lay.cat_fields):
        np.testing.assert_array_equal(cat[:, i], cols[f"cat__{f.name}"])
    for i, f in enumerate(lay.num_fields):
        np.testing.assert_array_equal(num[:, i], cols[f"num__{f.name}"])  # bit-exact, NaN-free
    for i, f in enumerate(lay.multi_fields):
        m = cols[f"multi__{f.name}"]
        np.testing.assert_array_equal(multi[:, i, : m.shape[1]], m)


def test_serve_command_answers_on_a_socket(ml, runs, tmp_path):
    frame, schema, ds, _ = ml
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sampletok.cli", "serve", "--data", str(ds.root), "--run", str(runs["din"])]
    cmd += ["--store", str(tmp_path / "store"), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError(proc.stdout.read().decode() if proc.stdout else "no output")
        rows = ds.rows("test")[:1]
        body = _requests(frame, schema, rows)[0][1]
        r = httpx.post(f"http://127.0.0.1:{port}/score", json=body, timeout=10)
        assert r.status_code == 200
        assert abs(r.json()["scores"][0] - _offline(ds, runs["din"], rows)[0]) < 1e-5
        bad = httpx.post(f"http://127.0.0.1:{port}/score", content=json.dumps({"user": 1}), timeout=10)
        assert bad.status_code == 422 and set(bad.json()) == {"error"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_schema_describes_the_request_with_an_example_that_scores(ml, runs, tmp_path):
    _, schema, ds, _ = ml
    client = TestClient(create_app(Scorer.from_run(ds, runs["din"], tmp_path / "store")))
    info = client.get("/schema").json()
    assert info["user"] == schema.user and set(info["fields"]) == {f.name for f in schema.features}
    assert info["fields"]["genres"]["type"] == "multi_categorical" and info["fields"]["item_id"]["examples"]
    r = client.post("/score", json={**info["example"], "ts": 10**10})
    assert r.status_code == 200, r.text
    assert r.json()["history"]["events"] > 0  # the example user is a known one, with history


@pytest.mark.parametrize("name", list(MODELS))
def test_concurrent_requests_batched_into_one_forward_score_as_offline(name, ml, runs, tmp_path):
    """Concurrent requests of different users, histories and candidate counts, grouped by the dynamic batcher
    into shared forwards, score each candidate as offline evaluate does."""
    import asyncio

    import httpx

    frame, schema, ds, _ = ml
    test = ds.rows("test")
    anchors = test[np.unique(np.asarray(ds.col("_user_key"))[test], return_index=True)[1][:8]]  # 8 users
    counts = [1, 3, 7, 12, 2, 20, 5, 9]
    item = [f.name for f in schema.features if f.group == "item"]
    bodies, wants = [], []
    for k, (row, n) in enumerate(zip(anchors.tolist(), counts, strict=True)):
        cand_rows = test[k * 20 : k * 20 + n]
        wants.append(_offline_one_request(ds, runs[name], int(row), cand_rows))
        r = frame.row(int(row), named=True)
        context = {f.name: r[f.name] for f in schema.features if f.group != "item" and f.name != schema.user}
        candidates = frame[cand_rows.tolist()].select(item).to_dicts()
        bodies.append(
            {"user": r[schema.user], "ts": int(r[schema.timestamp]), "context": context, "candidates": candidates}
        )
    config = ServingConfig(max_wait_us=200_000, max_batch_candidates=64)  # long enough for every request to join
    scorer = Scorer.from_run(ds, runs[name], tmp_path / "store")
    app = create_app(scorer, config)

    async def send() -> list:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await asyncio.gather(*(client.post("/score", json=body) for body in bodies))

    replies = asyncio.run(send())
    for reply in replies:
        assert reply.status_code == 200, reply.text
    assert len({r.json()["history"]["events"] for r in replies}) > 1  # histories of different lengths
    got = np.concatenate([r.json()["scores"] for r in replies])
    assert np.abs(got - np.concatenate(wants)).max() < 1e-5
    for body, reply in zip(bodies, replies, strict=True):  # what each history held, as when scored alone
        _, alone = scorer.score_request(body["user"], body["ts"], body["context"], body["candidates"])
        assert reply.json()["history"] == {k: v for k, v in alone.items() if k != "min_gap_s"}
    batcher = app.state.batcher
    assert batcher.largest_batch > 1  # requests did share forwards
    batcher.close()


def test_a_bad_request_in_a_batch_fails_alone(ml, runs, tmp_path):
    frame, schema, ds, _ = ml
    scorer = Scorer.from_run(ds, runs["din"], tmp_path / "store")
    (_, good), (_, other) = _requests(frame, schema, ds.rows("test")[:200:50])[:2]
    bad = {**good, "candidates": [{**good["candidates"][0], "nope": 1}]}
    q = [ScoreQuery(b["user"], b["ts"], b["context"], b["candidates"]) for b in (good, bad, other)]
    results = scorer.score_many(q)
    assert isinstance(results[1], DataError) and "nope" in str(results[1])
    for i in (0, 2):
        alone = scorer.score_request(q[i].user, q[i].ts, q[i].context, q[i].candidates)[0]
        assert np.abs(results[i][0] - alone).max() < 1e-6


def test_several_worker_processes_serve_one_redis_store(ml, runs, redis_url):
    """``serve --workers 2`` over Redis: two processes answer, both score as offline, and an event appended
    through one is read by requests the other answers."""
    import httpx

    frame, schema, ds, _ = ml
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = f"{redis_url}?store=workers"
    cmd = [sys.executable, "-m", "sampletok.cli", "serve", "--data", str(ds.root), "--run", str(runs["din"])]
    cmd += ["--store", store, "--reset", "--port", str(port), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    url = f"http://127.0.0.1:{port}"
    try:
        pids: set[int] = set()
        deadline = time.time() + 300
        while len(pids) < 2 and time.time() < deadline:
            try:  # a new connection each time: the kernel spreads them over the workers
                r = httpx.get(url + "/healthz", timeout=1, headers={"Connection": "close"})
                pids.add(r.json()["process"])
            except httpx.TransportError:
                time.sleep(0.2)
        assert len(pids) == 2, proc.stdout.read().decode() if proc.poll() is not None and proc.stdout else pids
        rows = ds.rows("test")[-1:]
        body = _requests(frame, schema, rows)[0][1]
        later = {**body, "user": "a-new-user", "ts": body["ts"] + 10}  # no history yet (the history is capped)
        before = {httpx.post(url + "/score", json=later, timeout=30).json()["history"]["events"] for _ in range(6)}
        event = {"user": "a-new-user", "ts": body["ts"] + 5, "fields": {**body["context"], **body["candidates"][0]}}
        assert httpx.post(url + "/events", json=event, timeout=30).status_code == 200
        seen, answered = set(), set()
        for _ in range(40):
            with httpx.Client(base_url=url, timeout=30) as c:
                seen.add(c.post("/score", json=later).json()["history"]["events"])
                answered.add(c.get("/healthz").json()["process"])
        assert before == {0} and seen == {1}  # every worker reads the appended event
        assert len(answered) == 2
        r = httpx.post(url + "/score", json=body, timeout=30)
        assert abs(r.json()["scores"][0] - _offline(ds, runs["din"], rows)[0]) < 1e-5
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_shared_fields_encoded_once_equal_full_row_encoding(ml, runs, tmp_path):
    """A request's user, time and context fields are encoded once and repeated over its candidates: the codes
    equal those of encoding every candidate as a full row — when the context is shared, when the candidates
    override a context field, with unseen values, and when candidates give different fields (encoded as full
    rows) — and one batch of such requests scores as each request alone."""
    frame, schema, ds, _ = ml
    scorer = Scorer.from_run(ds, runs["din"], tmp_path / "store")
    test = ds.rows("test")
    item = [f.name for f in schema.features if f.group == "item"]
    context_fields = [f.name for f in schema.features if f.group != "item" and f.name != schema.user]
    queries = []
    for k, row in enumerate(test[:400:50].tolist()):
        r = frame.row(row, named=True)
        context = {f: r[f] for f in context_fields}
        candidates = frame[test[k * 10 : k * 10 + 6].tolist()].select(item).to_dicts()
        if k == 1:  # every candidate overrides a context field with its own value
            candidates = [
                {**c, context_fields[0]: frame.row(int(test[100 + j]), named=True)[context_fields[0]]}
                for j, c in enumerate(candidates)
            ]
        if k == 2:  # values never seen in training, in the context and in a candidate
            unseen = {f.name: f for f in schema.features if f.type.value == "categorical" and f.group != "item"}
            name = next(n for n in context_fields if n in unseen)
            context = {**context, name: 10**9 if isinstance(context[name], int) else "never-seen"}
            candidates[0] = {**candidates[0], item[0]: 10**9}
        if k == 3:  # candidates with different fields: the full-row path
            candidates[1] = {**candidates[1], context_fields[0]: r[context_fields[0]]}
        queries.append(ScoreQuery(r[schema.user], int(r[schema.timestamp]), context, candidates))
    checked = [(i, *scorer._checked(q)) for i, q in enumerate(queries)]
    assert [rr.shared is None for _, _, rr in checked] == [k == 3 for k in range(len(queries))]
    split = dict(scorer._encode_each(checked, [None] * len(queries)))
    for i, q in enumerate(queries):
        full = scorer.encoder.encode(scorer.rows(q.user, q.ts, q.context, q.candidates), origin="request")
        assert set(split[i]) == set(full)
        for name, codes in full.items():
            np.testing.assert_array_equal(split[i][name], codes, err_msg=f"request {i}, {name}")
    together = scorer.score_many(queries)
    for i, q in enumerate(queries):
        alone = scorer.score_request(q.user, q.ts, q.context, q.candidates)[0]
        assert np.abs(together[i][0] - alone).max() < 1e-6


def test_warm_up_runs_an_event_path_and_stores_nothing(ml, runs, tmp_path):
    """The service warms an event's path at start (its first event was ~250 ms cold), writing nothing."""
    _, _, ds, _ = ml
    scorer = Scorer.from_run(ds, runs["iat"], tmp_path / "store")
    user = scorer.user_key(scorer.describe()["example"]["user"])
    far = np.array([np.iinfo(np.int64).max // 2])

    def held() -> tuple[int, int]:
        events = scorer.events.fetch(np.array([user]), far, 10_000, dequantize=False).mask.sum()
        assert scorer.tokens is not None
        return int(events), int(scorer.tokens.store.fetch(np.array([user]), far, 10_000).mask.sum())

    before = held()
    assert before[0] > 0
    tokenized = []
    original = scorer._token_of
    scorer._token_of = lambda *a: tokenized.append(original(*a))  # the event's token is computed, not stored
    scorer.warm_up()
    assert held() == before
    assert len(tokenized) == 1 and tokenized[0] is not None and np.isfinite(tokenized[0]).all()
