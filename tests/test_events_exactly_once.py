"""Events that are exactly once (issue 24, item 3), on both backends: a client's ``event_id`` makes /events
idempotent, and an event row and its token are committed together, so no reader sees one without the other,
whatever fails between them (an injected failure, a crash at the local store's commit record)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from sampletok.errors import ConflictError  # noqa: E402
from sampletok.serving.app import create_app  # noqa: E402
from sampletok.serving.scorer import Scorer, store_location  # noqa: E402
from sampletok.store.base import Instances  # noqa: E402
from sampletok.store.local import PENDING, LocalTokenStore  # noqa: E402
from sampletok.store.locations import append_together, open_store  # noqa: E402
from sampletok.train.experiment import ModelSpec, run_model  # noqa: E402
from sampletok.train.trainer import TrainConfig  # noqa: E402

FIELDS = {"iid": 3, "tags": ["1", "2"], "price": 9.5, "pop": 0.3}
SOURCE = dict(epochs=1, hidden=[32], decompress=[16], emb_dim=8, window=16, batch_size=256, dtype="float32")
IAT = {
    "base": "din",
    "token_len": 8,
    "token_dim": 8,
    "side_dim": 4,
    "encoder_layers": 0,
    "source": {"scheme": "user", "folds": 2, **SOURCE},
}


@pytest.fixture(scope="module")
def iat_run(synth_prepared, tmp_path_factory):
    """(dataset, run folder) of a small DIN + IAT run: its events append a token beside the event row."""
    root = tmp_path_factory.mktemp("iat-events")
    params = {**IAT, "cache_dir": str(root / "cache")}
    cfg = TrainConfig(max_epochs=1, batch_size=512, hist_len=8)
    run_model(synth_prepared, ModelSpec(name="iat", params=params), cfg, seed=3, run_dir=root / "run", progress=False)
    return synth_prepared, root / "run"


@pytest.fixture(params=["local", "redis"])
def location(request, tmp_path):
    """Where the service's stores live: a folder, or a fresh store name on a test redis-server."""
    if request.param == "local":
        return str(tmp_path / "store")
    url = request.getfixturevalue("redis_url")
    return f"{url}?store=ev{uuid.uuid4().hex[:8]}"


def _event(ds, user: str, ts: int, event_id: str | None = "e-1") -> dict:
    scorer_fields = {f.name: _value(f) for f in ds.schema.features if f.name != ds.schema.user}
    body = {"user": user, "ts": ts, "fields": scorer_fields, "responses": {r: 1 for r in ds.schema.task_labels}}
    return body if event_id is None else {**body, "event_id": event_id}


def _value(f):
    return ["1"] if f.type.value == "multi_categorical" else (1.0 if f.type.value == "numeric" else "1")


def _count(store, key: int) -> int:
    return int(store.fetch(np.array([key]), np.array([2**61]), 10_000, dequantize=False).mask.sum())


def test_a_retried_event_is_stored_once_with_its_token(iat_run, location):
    ds, run = iat_run
    scorer = Scorer.from_run(ds, run, location)
    assert scorer.tokens is not None
    client = TestClient(create_app(scorer), raise_server_exceptions=False)
    key = Scorer.user_key("new-user")
    body = _event(ds, "new-user", 10**9)
    first = client.post("/events", json=body)
    assert first.status_code == 200 and first.json()["duplicate"] is False, first.text
    for _ in range(3):  # a client retrying after a lost reply
        again = client.post("/events", json=body)
        assert again.status_code == 200, again.text
        assert again.json() == {"instance_id": first.json()["instance_id"], "duplicate": True}
    assert _count(scorer.events, key) == 1 and _count(scorer.tokens.store, key) == 1
    # and so it is for a fresh process opening the stores
    events, tokens = open_store(store_location(location, "events")), open_store(store_location(location, "tokens"))
    assert _count(events, key) == 1 and _count(tokens, key) == 1
    # another event under a used id is refused in one line, and stores nothing
    other = client.post("/events", json={**body, "ts": 10**9 + 5})
    assert other.status_code == 409 and "event id" in other.json()["error"], other.text
    assert _count(scorer.events, key) == 1
    # events without an id, or with another id, are each stored
    assert client.post("/events", json=_event(ds, "new-user", 10**9 + 7, None)).status_code == 200
    assert client.post("/events", json=_event(ds, "new-user", 10**9 + 7, "e-2")).json()["duplicate"] is False
    assert _count(scorer.events, key) == 3 and _count(scorer.tokens.store, key) == 3


def test_a_failure_between_the_event_and_its_token_leaves_neither(iat_run, location, monkeypatch):
    """The token write fails after the event row was prepared (its payload is refused by the store): before
    the one commit, the event row reached the store first and stayed there without its token."""
    ds, run = iat_run
    scorer = Scorer.from_run(ds, run, location)
    assert scorer.tokens is not None
    client = TestClient(create_app(scorer), raise_server_exceptions=False)
    key = Scorer.user_key("crash-user")
    tokenizer = scorer.event_tokenizer
    assert tokenizer is not None
    monkeypatch.setattr(tokenizer, "encode_event", lambda batch: np.zeros((1, 3), np.float32))  # a wrong shape
    r = client.post("/events", json=_event(ds, "crash-user", 10**9))
    assert r.status_code >= 400 and "\n" not in r.json()["error"]
    assert _count(scorer.events, key) == 0 and _count(scorer.tokens.store, key) == 0
    monkeypatch.undo()
    r = client.post("/events", json=_event(ds, "crash-user", 10**9))  # the retry lands, once
    assert r.status_code == 200 and r.json()["duplicate"] is False
    assert _count(scorer.events, key) == 1 and _count(scorer.tokens.store, key) == 1


def _two_stores(tmp_path):
    def one(name: str) -> LocalTokenStore:
        s = LocalTokenStore.create(tmp_path / name, producer="p", payload_shape=(2,), response_names=["click"],
                                   dtype="float32")  # fmt: skip
        s.commit()
        return s

    return one("events"), one("tokens")


def _rows(iid: int, ts: int) -> Instances:
    return Instances(np.array([iid]), np.array([7]), np.array([ts]), np.array([[1.0, float(ts)]]), np.ones((1, 1)))


def test_a_crash_before_the_local_commit_record_leaves_neither_store_changed(tmp_path):
    events, tokens = _two_stores(tmp_path)
    append_together([(events, _rows(1, 10)), (tokens, _rows(1, 10))])

    def crash() -> None:
        raise OSError("power cut")

    events.on_before_commit = crash  # after both segments and manifests are written, before the record
    with pytest.raises(OSError):
        append_together([(events, _rows(2, 20)), (tokens, _rows(2, 20))])
    assert PENDING in os.listdir(tmp_path / "tokens")  # the secondary was prepared
    for name in ("events", "tokens"):  # a fresh reader of either: the old state, the prepared record undone
        assert len(LocalTokenStore.open(tmp_path / name)) == 1
    assert not any((tmp_path / n / PENDING).exists() for n in ("events", "tokens"))


@pytest.mark.parametrize("first_opened", ["events", "tokens"])
def test_a_crash_after_the_local_commit_record_is_finished_by_the_next_open(tmp_path, first_opened):
    """A process killed (os._exit) right after the commit point: the next open of either store switches
    both, so the event is there with its token."""
    events, tokens = _two_stores(tmp_path)
    code = f"""
import os, numpy as np
from sampletok.store import local
from sampletok.store.base import Instances
from sampletok.store.local import LocalTokenStore, commit_appends
ev, tok = LocalTokenStore.open({str(tmp_path / "events")!r}), LocalTokenStore.open({str(tmp_path / "tokens")!r})
real = local._write_record
def die_after_the_first_record(root, record):
    real(root, record)
    if "primary" not in record:
        os._exit(9)
local._write_record = die_after_the_first_record
rows = Instances(np.array([5]), np.array([7]), np.array([30]), np.array([[1.0, 30.0]]), np.ones((1, 1)))
commit_appends([(ev, ev._checked(*rows), None), (tok, tok._checked(*rows), None)])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    assert (tmp_path / "events" / PENDING).exists()
    record = json.loads((tmp_path / "events" / PENDING).read_text())
    assert {s["root"] for s in record["stores"]} == {".", os.path.join("..", "tokens")}
    other = "tokens" if first_opened == "events" else "events"
    assert len(LocalTokenStore.open(tmp_path / first_opened)) == 1
    assert len(LocalTokenStore.open(tmp_path / other)) == 1
    assert not any((tmp_path / n / PENDING).exists() for n in ("events", "tokens"))


def test_local_retry_and_conflict_without_the_service(tmp_path):
    events, tokens = _two_stores(tmp_path)
    assert append_together([(events, _rows(9, 10)), (tokens, _rows(9, 10))], unique=True) is True
    assert append_together([(events, _rows(9, 10)), (tokens, _rows(9, 10))], unique=True) is False
    with pytest.raises(ConflictError, match="other content"):
        append_together([(events, _rows(9, 11)), (tokens, _rows(9, 11))], unique=True)
    assert len(LocalTokenStore.open(tmp_path / "events")) == len(LocalTokenStore.open(tmp_path / "tokens")) == 1


def test_a_local_store_appended_one_event_at_a_time_keeps_few_segments(tmp_path):
    """Each append merges the small trailing segments into its own (a binary counter): 300 single appends
    leave at most log2(300) + 1 segments, so open memory maps stay bounded, and every row is still there in
    append order."""
    events, _ = _two_stores(tmp_path)
    for i in range(300):
        events.append(*_rows(i, 1000 + i))
    segments = LocalTokenStore.open(tmp_path / "events").manifest["segments"]
    assert len(segments) <= 9, len(segments)
    assert len(os.listdir(tmp_path / "events" / "segments")) == len(segments)  # merged ones are removed
    got = events.fetch(np.array([7]), np.array([10**6]), 300)
    np.testing.assert_array_equal(got.payload[0, :, 1], 1000 + np.arange(300))
    np.testing.assert_array_equal(LocalTokenStore.open(tmp_path / "events").read("instance_id"), np.arange(300))


def _responses_seen(store, key: int, at: int) -> tuple[list, list]:
    """(known flags, values) of the user's events visible at ``at``, oldest first."""
    f = store.fetch(np.array([key]), np.array([at]), 10, dequantize=False)
    return f.response_mask[0, f.mask[0]].tolist(), f.responses[0, f.mask[0]].tolist()


def test_a_late_response_reaches_both_stores_once_known(iat_run, location):
    """PATCH /events/{id}: an event stored without its response gets it later, with its own known-at time, in
    the event store and the token store together; requests before that time never see it."""
    ds, run = iat_run
    scorer = Scorer.from_run(ds, run, location)
    client = TestClient(create_app(scorer), raise_server_exceptions=False)
    label = ds.schema.task_labels[0]
    key, t = Scorer.user_key("late-user"), 10**9
    body = {**_event(ds, "late-user", t, "late-1"), "responses": {}}  # the outcome is not known yet
    assert client.post("/events", json=body).status_code == 200
    where = ds.schema.response_names.index(label)
    stores = [scorer.events, scorer.tokens.store]
    for store in stores:
        assert not _responses_seen(store, key, t + 10**6)[0][0][where]
    r = client.patch("/events/late-1", json={"user": "late-user", "responses": {label: 1}, "known_at": {label: t + 50}})
    assert r.status_code == 200, r.text
    assert r.json()["instance_id"] == client.post("/events", json=body).json()["instance_id"]  # same event
    for fresh in (open_store(store_location(location, "events")), open_store(store_location(location, "tokens"))):
        known_before, _ = _responses_seen(fresh, key, t + 50)  # strictly before its known-at: still unknown
        known_after, values = _responses_seen(fresh, key, t + 51)
        assert len(known_after) == 1 and not known_before[0][where] and known_after[0][where]
        assert values[0][where] == 1.0
    assert _count(scorer.events, key) == 1  # updated in place, no second row
    # a response cannot be known before its event; an unknown event or user is 404; one line each
    early = client.patch("/events/late-1", json={"user": "late-user", "responses": {label: 0}, "known_at": {label: 5}})
    assert early.status_code == 400 and "before its event" in early.json()["error"]
    missing = client.patch("/events/nope", json={"user": "late-user", "responses": {label: 1}})
    other = client.patch("/events/late-1", json={"user": "someone-else", "responses": {label: 1}})
    assert missing.status_code == other.status_code == 404 and "\n" not in missing.json()["error"]
    assert client.patch("/events/late-1", json={"user": "late-user", "responses": {"nope": 1}}).status_code == 400
