"""The service against a hostile-but-realistic client (issue 24, items 5 and 6): a bearer token, a body limit,
one-line errors on every path, strict types, and events that cannot break the store or a later score."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from sampletok.serving.app import create_app  # noqa: E402
from sampletok.serving.config import ServingConfig  # noqa: E402
from sampletok.serving.scorer import Scorer, store_location  # noqa: E402
from sampletok.train.experiment import ModelSpec, run_model  # noqa: E402
from sampletok.train.trainer import TrainConfig  # noqa: E402

TRAIN = TrainConfig(max_epochs=1, hist_len=8, batch_size=256)
FIELDS = {"iid": 3, "tags": ["1", "2"], "price": 9.5, "pop": 0.3}
TOKEN = "s3cret-token-of-32-characters-ok"


@pytest.fixture
def served(toy_prepared, tmp_path):
    """(dataset, run folder, store folder, a client factory) over a small DIN run on the toy log."""
    ds = toy_prepared.load_into_memory()
    run = tmp_path / "run"
    run_model(ds, ModelSpec(name="din", params={"history_responses": True}), TRAIN, 1, run_dir=run, progress=False)

    def client(config: ServingConfig | None = None, scorer: Scorer | None = None) -> TestClient:
        scorer = scorer or Scorer.from_run(ds, run, tmp_path / "store")
        return TestClient(create_app(scorer, config), raise_server_exceptions=False)

    return ds, run, tmp_path / "store", client


def _score(user: str = "u-1", ts: int = 10_000) -> dict:
    return {"user": user, "ts": ts, "candidates": [dict(FIELDS)]}


def _one_line_error(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err and "\n" not in err and "Traceback" not in err
    return err


def test_a_set_token_is_required_on_score_and_events_but_not_on_healthz(served):
    *_, client = served
    c = client(ServingConfig(token=TOKEN))
    assert "bearer token" in _one_line_error(c.post("/score", json=_score()), 401)
    wrong = {"Authorization": "Bearer " + "x" * len(TOKEN)}
    _one_line_error(c.post("/score", json=_score(), headers=wrong), 401)
    _one_line_error(c.post("/events", json={"user": 1, "ts": 5, "fields": FIELDS}, headers=wrong), 401)
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert c.post("/score", json=_score(), headers=good).status_code == 200
    assert c.get("/healthz").status_code == 200
    assert client().post("/score", json=_score()).status_code == 200  # no token set: open


def test_an_oversized_body_is_413(served):
    *_, client = served
    c = client(ServingConfig(max_body_bytes=4096))
    many = {**_score(), "candidates": [dict(FIELDS)] * 200}  # ~12 KB
    assert "body over 4096 bytes" in _one_line_error(c.post("/score", json=many), 413)
    assert c.post("/score", json=_score()).status_code == 200


def test_an_event_far_in_the_past_is_refused_and_breaks_no_later_request(served):
    ds, run, store, client = served
    c = client()
    body = {"user": "u-1", "ts": -4 * 10**18, "fields": FIELDS}  # span × users over 2^62
    assert "too far from the stored ones" in _one_line_error(c.post("/events", json=body), 400)
    assert c.post("/score", json=_score("another-user")).status_code == 200
    # and after a restart on the same store
    again = client(scorer=Scorer.from_run(ds, run, store))
    assert again.post("/score", json=_score("u-1")).status_code == 200


@pytest.mark.parametrize(
    "responses",
    [{"click": 10}, {"click": 1e30}, {"click": -1e6}, {"buy": 2}],
    ids=["label-10", "label-1e30", "label-negative", "binary-response-2"],
)
def test_a_response_outside_its_type_is_refused_and_scores_stay_numbers(served, responses):
    *_, client = served
    c = client()
    body = {"user": "u-7", "ts": 5_000, "fields": FIELDS, "responses": responses}
    _one_line_error(c.post("/events", json=body), 400)
    r = c.post("/score", json=_score("u-7", 6_000))
    assert r.status_code == 200 and all(isinstance(s, float) and math.isfinite(s) for s in r.json()["scores"])


def test_a_numeric_field_far_out_of_range_is_refused(served):
    *_, client = served
    c = client()
    body = {"user": "u-7", "ts": 5_000, "fields": {**FIELDS, "price": 1e30}}
    assert "price" in _one_line_error(c.post("/events", json=body), 400)
    assert "price" in _one_line_error(c.post("/score", json={**_score(), "candidates": [body["fields"]]}), 400)


def test_history_gaps_are_only_for_trusted_callers(served):
    *_, client = served
    assert "min_gap_s" not in client().post("/score", json=_score()).json()["history"]
    gap = client(ServingConfig(expose_history_gap=True)).post("/score", json=_score()).json()["history"]
    assert "min_gap_s" in gap


def test_every_error_path_answers_one_line_and_types_are_strict(served):
    *_, client = served
    c = client()
    assert "Unicode" in _one_line_error(
        c.post(
            "/score", content=b'{"user": "\\ud800", "candidates": [{}]}', headers={"content-type": "application/json"}
        ),
        400,
    )
    _one_line_error(c.get("/no-such-path"), 404)
    _one_line_error(c.get("/score"), 405)
    r = c.post("/score", content=b'{"user": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and "\n" not in r.json()["error"]  # invalid UTF-8
    deep = b"[" * 100_000 + b"]" * 100_000
    r = c.post("/score", content=deep, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and "\n" not in r.json()["error"]
    for ts in ("123", True, 1.5):
        _one_line_error(c.post("/score", json={**_score(), "ts": ts}), 422)
        _one_line_error(c.post("/events", json={"user": "u", "ts": ts, "fields": FIELDS}), 422)
    r = c.get("/openapi.json")
    assert r.status_code == 200 and "/score" in r.json()["paths"]


def test_a_crashed_appends_temporary_is_removed_when_the_service_starts(served):
    ds, run, store, client = served
    client()  # makes the stores
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    segments = os.path.join(store_location(store, "events"), "segments")
    left = os.path.join(segments, f".seg-00000000000000000001-deadbeef.tmp-{int(dead.stdout)}")
    os.makedirs(left)
    Scorer.from_run(ds, run, store)
    assert not os.path.exists(left)


def test_a_redis_store_lost_in_a_restart_makes_the_service_unhealthy(served, redis_url):
    """Redis restarted without persistence (here: the service's keys deleted): /healthz and /score answer 503
    in one line, and an event is refused rather than written into a version no one will open."""
    import uuid

    import redis

    ds, run, _, client = served
    prefix = f"svc{uuid.uuid4().hex[:8]}"
    c = client(scorer=Scorer.from_run(ds, run, f"{redis_url}?store={prefix}"))
    assert c.get("/healthz").status_code == 200 and c.post("/score", json=_score()).status_code == 200
    server = redis.Redis.from_url(redis_url)
    server.delete(*server.scan_iter(match=f"{prefix}:*"))
    assert "gone from the server" in _one_line_error(c.get("/healthz"), 503)
    _one_line_error(c.post("/score", json=_score()), 503)
    _one_line_error(c.post("/events", json={"user": "u-1", "ts": 20_000, "fields": FIELDS}), 503)


def test_a_full_queue_answers_503_with_retry_after(served):
    """The batcher's queue is bounded: with the scorer busy and ``max_queue`` requests waiting, the next
    request is refused at once (one line, Retry-After), and the waiting ones are still answered."""
    import asyncio
    import threading

    import httpx

    ds, run, store, _ = served
    scorer = Scorer.from_run(ds, run, store)
    gate, inner = threading.Event(), scorer.score_many

    def slow(queries):
        gate.wait(10)
        return inner(queries)

    scorer.score_many = slow  # type: ignore[method-assign]
    app = create_app(scorer, ServingConfig(max_queue=1, max_wait_us=0))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            held = asyncio.ensure_future(c.post("/score", json=_score()))
            await asyncio.sleep(0.3)  # taken by the worker
            queued = asyncio.ensure_future(c.post("/score", json=_score("u-2")))
            await asyncio.sleep(0.3)
            refused = await c.post("/score", json=_score("u-3"))
            healthy = asyncio.ensure_future(c.get("/healthz"))  # a health check is never refused for load
            await asyncio.sleep(0.1)
            gate.set()
            return refused, await held, await queued, await healthy

    refused, held, queued, healthy = asyncio.run(main())
    assert "capacity" in _one_line_error(refused, 503)
    assert refused.headers["retry-after"] == "1"
    assert held.status_code == queued.status_code == healthy.status_code == 200
    app.state.batcher.close()


def test_several_workers_need_a_redis_store():
    from sampletok.errors import ConfigError, validated

    with pytest.raises(ConfigError, match="redis"):
        validated(ServingConfig, {"workers": 2, "store": "runs/store"}, where="serve")
    assert ServingConfig(workers=2, store="redis://127.0.0.1:6379/0").workers == 2
