"""Durability, stated and tested (issue 24, item 4): real processes killed with SIGKILL while a client streams
/events. Every event the service acknowledged (a 200 reply) must be in the stores afterwards:

* ``redis-server`` with ``appendonly yes``, ``appendfsync always`` killed mid-stream and restarted on its
  folder (the AOF replays): the service answers 503 while it is down, is healthy again once it is back, and a
  fresh reader finds every acknowledged event;
* the service itself killed mid-burst, on a local store folder and on Redis (AOF): restarted without
  ``--reset`` it opens, holds every acknowledged event (a re-sent one is a duplicate with the same instance
  id), nothing else but events that were sent, every event row with its token (IAT), and no commit record or
  temporary is left in a local store.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import sampletok  # noqa: E402
from sampletok.columns import INSTANCE_ID, USER_KEY  # noqa: E402
from sampletok.data.prepare import prepare  # noqa: E402
from sampletok.data.sources import FrameSource  # noqa: E402
from sampletok.features import FeatureLayout  # noqa: E402
from sampletok.schema import Schema  # noqa: E402
from sampletok.serving.events import EventCodec, open_events  # noqa: E402
from sampletok.serving.scorer import Scorer, instance_id_of, store_location  # noqa: E402
from sampletok.store.local import PENDING  # noqa: E402
from sampletok.store.locations import open_store  # noqa: E402
from sampletok.train.experiment import ModelSpec, run_model  # noqa: E402
from sampletok.train.trainer import TrainConfig  # noqa: E402
from tests.conftest import TOY_SCHEMA, toy_frame  # noqa: E402

SRC = str(Path(sampletok.__file__).resolve().parents[1])  # the service subprocess runs this very code
SOURCE = dict(epochs=1, hidden=[32], decompress=[16], emb_dim=8, window=16, batch_size=256, dtype="float32")
IAT = {"base": "din", "token_len": 8, "token_dim": 8, "side_dim": 4, "encoder_layers": 0}
USERS: list[str | int] = [0, 1, 2, "dur-new-user"]  # three users of the toy log (with history) and a new one
START_S = 180.0  # a service start (imports, model, stores) on a loaded 2-core machine
WAIT_S = 60.0  # any other wait


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str, why=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; {why()}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def iat_run(tmp_path_factory):
    """(dataset, run folder) of a small DIN + IAT run on the toy log: each event appends its token beside the
    event row (two stores committed together)."""
    root = tmp_path_factory.mktemp("durability")
    df = toy_frame().unique(subset=["uid", "iid", "ts"], keep="first", maintain_order=True)
    ds = prepare(FrameSource(df, "toy"), Schema.model_validate(TOY_SCHEMA), root / "toy", progress=False)
    ds = ds.load_into_memory()
    cfg = TrainConfig(max_epochs=1, hist_len=8, batch_size=256)
    params = {**IAT, "source": {"scheme": "user", "folds": 2, **SOURCE}, "cache_dir": str(root / "cache")}
    run_model(ds, ModelSpec(name="iat", params=params), cfg, 1, run_dir=root / "run", progress=False)
    return ds, root / "run"


class RedisServer:
    """A real ``redis-server`` on a fixed loopback port and folder, so it can be killed and started again on
    its files. ``appendonly``: the AOF, fsynced before every reply (``appendfsync always``)."""

    def __init__(self, folder: Path, appendonly: bool = True):
        exe = shutil.which("redis-server")
        if exe is None:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail("redis-server is missing but CI=true: .ci/run must install it")
            pytest.skip("redis-server not installed (apt-get install -y redis-server)")
        folder.mkdir(parents=True, exist_ok=True)
        self.exe, self.folder, self.port, self.appendonly = exe, folder, _free_port(), appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), "--save", ""]
        args += ["--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always"]
        log = open(self.folder / "redis.log", "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=1)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, (self.folder / "redis.log").read_text()
            try:
                return bool(client.ping())  # a LOADING server (replaying its AOF) is an error: not yet
            except redis.RedisError:
                return False

        try:
            _wait(up, WAIT_S, f"redis-server on port {self.port}")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT_S)


class Service:
    """``sampletok serve`` as its own process, on a fixed port over one store location."""

    def __init__(self, ds, run: Path, store: str, folder: Path):
        self.ds, self.run, self.store, self.port = ds, run, store, _free_port()
        self.log = folder / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, reset: bool = False) -> None:
        cmd = [sys.executable, "-m", "sampletok.cli", "serve", "--data", str(self.ds.root), "--run", str(self.run)]
        cmd += ["--store", self.store, "--port", str(self.port)] + (["--reset"] if reset else [])
        path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": path}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.wait_healthy(START_S)

    def healthz(self) -> int | None:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=5).status_code
        except httpx.TransportError:
            return None

    def wait_healthy(self, timeout: float = WAIT_S) -> None:
        def ok() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"the service exited: {self.output()}"
            return self.healthz() == 200

        _wait(ok, timeout, "GET /healthz 200", self.output)

    def output(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=WAIT_S)


def _event(prefix: str, i: int) -> dict:
    """The i-th event of a stream: its users in turn, times after the log's, a distinct event id."""
    fields = {"iid": i % 30, "tags": [str(i % 5), "2"], "price": 9.5 + i % 7, "pop": 0.3}
    return {"user": USERS[i % len(USERS)], "ts": 1_000 + i, "fields": fields, "event_id": f"{prefix}-{i}"}


class Stream(threading.Thread):
    """A client sending events one at a time, each once: ``acked`` holds those answered 200 (event id → reply),
    ``sent`` every one it tried, ``failed`` the other answers (status, or None for no connection)."""

    def __init__(self, url: str, prefix: str):
        super().__init__(daemon=True)
        self.url, self.prefix = url, prefix
        self.sent: dict[str, dict] = {}
        self.acked: dict[str, dict] = {}
        self.failed: list[int | None] = []
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=30) as client:
                i = 0
                while not self.stopping.is_set():
                    body = _event(self.prefix, i)
                    self.sent[body["event_id"]] = body  # before it goes: a kill may store it unanswered
                    try:
                        r = client.post(f"{self.url}/events", json=body)
                    except httpx.TransportError:
                        self.failed.append(None)
                        time.sleep(0.01)
                    else:
                        if r.status_code == 200:
                            self.acked[body["event_id"]] = r.json()
                        else:
                            assert r.status_code == 503, (r.status_code, r.text)  # the store is down: refused
                            self.failed.append(r.status_code)
                    i += 1
        except BaseException as e:  # reported by stop()
            self.error = e

    def wait(self, cond, what: str) -> None:
        _wait(lambda: cond() or not self.is_alive(), WAIT_S, what, lambda: f"acked {len(self.acked)}")
        assert self.error is None, self.error

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=WAIT_S)
        assert not self.is_alive(), "the client did not stop"
        assert self.error is None, self.error


def _merged(streams: list[Stream]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(every event sent, every one acknowledged) by these clients (their event ids are distinct)."""
    sent = {e: b for st in streams for e, b in st.sent.items()}
    acked = {e: r for st in streams for e, r in st.acked.items()}
    assert len(sent) == sum(len(st.sent) for st in streams)
    return sent, acked


def _check_stored(ds, location: str, streams: list[Stream], tokens: bool) -> None:
    """A fresh reader of the stores at ``location`` finds every acknowledged event, and besides the log's rows
    only events that were sent; with ``tokens``, the token store holds exactly the event store's instances."""
    sent, acked = _merged(streams)
    events = open_events(store_location(location, "events"), ds.fingerprint, EventCodec(FeatureLayout.from_dataset(ds)))
    iids, users = np.asarray(events.read("instance_id")), np.asarray(events.read("user"))
    assert len(np.unique(iids)) == len(iids), "an instance stored twice"
    stored = set(iids.tolist())
    acked_iids = {int(reply["instance_id"]) for reply in acked.values()}
    assert acked_iids == {instance_id_of(e) for e in acked}
    assert not acked_iids - stored, f"{len(acked_iids - stored)} of {len(acked_iids)} acknowledged events lost"
    assert stored - set(np.asarray(ds.col(INSTANCE_ID)).tolist()) <= {instance_id_of(e) for e in sent}, (
        "an event stored that was never sent"
    )
    log_users = np.asarray(ds.col(USER_KEY))
    for user in USERS:  # per user: the log's rows + acknowledged events <= stored <= the log's rows + sent
        key = Scorer.user_key(user)
        n_acked = sum(b["user"] == user for e, b in sent.items() if e in acked)
        n_sent = sum(b["user"] == user for b in sent.values())
        base, n_stored = int((log_users == key).sum()), int((users == key).sum())
        assert base + n_acked <= n_stored <= base + n_sent, (user, base, n_acked, n_stored, n_sent)
    if tokens:
        token_iids = np.asarray(open_store(store_location(location, "tokens")).read("instance_id"))
        assert set(token_iids.tolist()) == stored, "an event row without its token, or a token alone"
        assert len(token_iids) == len(iids)


def _resend_acked(service: Service, streams: list[Stream]) -> None:
    """Every acknowledged event, sent again, is a duplicate of the stored one: the same instance id."""
    sent, acked = _merged(streams)
    with httpx.Client(timeout=30) as client:
        for event_id, reply in acked.items():
            r = client.post(f"{service.url}/events", json=sent[event_id])
            assert r.status_code == 200, r.text
            assert r.json() == {"instance_id": reply["instance_id"], "duplicate": True}, (event_id, r.json())


def _leftovers(folder: Path) -> list[str]:
    """A local store's commit records and temporaries (of a commit cut off by a crash)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name == PENDING or ".tmp-" in p.name)


def test_redis_aof_keeps_every_acknowledged_event_through_a_kill_9_of_redis(iat_run, tmp_path):
    """SIGKILL of redis-server (AOF, fsync always) mid-stream: requests are refused (503) while it is down and
    never counted; restarted on its folder, a fresh reader finds every acknowledged event and its token; the
    service is healthy again by itself and takes events."""
    ds, run = iat_run
    server = RedisServer(tmp_path / "redis", appendonly=True)
    location = f"{server.url}?store=dur"
    service = Service(ds, run, location, tmp_path)
    streams = [Stream(service.url, "before-kill"), Stream(service.url, "after-restart")]
    try:
        server.start()
        service.start(reset=True)
        first, second = streams
        first.start()
        first.wait(lambda: len(first.acked) >= 30, "30 acknowledged events")
        server.kill()  # mid-stream
        down = len(first.failed)
        first.wait(lambda: len(first.failed) >= down + 5, "requests refused while redis is down")
        assert service.healthz() == 503  # the service says so
        first.stop()
        assert first.failed and all(f == 503 for f in first.failed), first.failed  # no other answer
        server.start()  # same port and folder: the AOF replays
        _check_stored(ds, location, [first], tokens=True)  # a fresh reader, before the service touches it
        service.wait_healthy()  # the service's client reconnects by itself
        second.start()
        second.wait(lambda: len(second.acked) >= 10, "acknowledged events after the restart")
        second.stop()
        _check_stored(ds, location, streams, tokens=True)
        _resend_acked(service, streams)
    finally:
        for stream in streams:
            stream.stopping.set()
        service.kill()
        server.kill()


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_kill_9_of_the_service_mid_burst_loses_no_acknowledged_event(backend, iat_run, tmp_path):
    """Three rounds of: a burst of events, SIGKILL of the service mid-burst, a restart on the store as it was
    left (no --reset). A kill lands inside an append's commit often (its fsyncs are most of a request's time):
    a local store is then left with a commit record or a temporary, which the restart's open finishes or
    removes."""
    ds, run = iat_run
    server = RedisServer(tmp_path / "redis", appendonly=True) if backend == "redis" else None
    location = f"{server.url}?store=dur" if server is not None else str(tmp_path / "store")
    service = Service(ds, run, location, tmp_path)
    streams: list[Stream] = []
    try:
        if server is not None:
            server.start()
        service.start(reset=True)
        for round_ in range(3):
            stream = Stream(service.url, f"{backend}-burst-{round_}")
            streams.append(stream)
            stream.start()
            stream.wait(lambda st=stream: len(st.acked) >= 20, "20 acknowledged events")
            service.kill()  # mid-burst: the next request is being served
            gone = len(stream.failed)
            stream.wait(lambda st=stream, n=gone: len(st.failed) > n + 2, "requests failing with the service gone")
            stream.stop()
            if server is None and round_ == 0:  # what a kill inside an atomic file write leaves (a dead writer's)
                dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
                (tmp_path / "store" / "events" / f".CURRENT.tmp-{int(dead.stdout)}").write_text("manifest-0")
            service.start(reset=False)  # the same store, as it was left
            if server is None:
                for part in ("events", "tokens"):
                    assert _leftovers(tmp_path / "store" / part) == [], part
            _check_stored(ds, location, streams, tokens=True)
            _resend_acked(service, streams)
    finally:
        for stream in streams:
            stream.stopping.set()
        service.kill()
        if server is not None:
            server.kill()
