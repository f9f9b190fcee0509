"""Load test of the scoring service on loopback: concurrent clients mixing POST /score (100 candidates,
history L = 256) and POST /events against `sampletok serve` with a local and a Redis store.

For each model × backend it starts the service in its own process (a fresh store made from the dataset),
runs ``--clients`` client threads for ``--requests`` requests or ``--seconds`` (whichever ends first), then
prints P50/P99 latency per endpoint and throughput, and checks that

* every acknowledged event is in the store (a fresh reader counts each user's events: the dataset's rows
  plus the acknowledged appends, nothing lost), and
* no score read history at or after its request time (each reply reports its history's smallest gap, which
  must be > 0; requests and events draw their times from one clock, so the events other clients
  append are in one request's past and another's future; an event and a request often share a timestamp).
  The exit status is 1 when an event is lost, a score read the future or a request failed.

Then the cost per candidate as a request grows (1, 10, 100, 1000 candidates; sequential requests).

The models are trained briefly here (1 epoch on the latest 2 % of the training requests; cached under
``--out``): latency does not depend on how well a model ranks. DIN + IAT (user-order source, 256 tokens,
item-ID history 256), SIF at L = 256 (``isolate_target``: one history pass per request) and, for contrast,
SIF as trained by default (its history pass runs once per candidate).

Run: python benchmarks/bench_serve.py --data ../shared/data/ml-100k [--clients 4] [--requests 400]
     [--seconds 60] [--models iat,sif-isolated,sif] [--backends local,redis]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MODELS = {
    "iat": (
        "DIN + IAT",
        "iat",
        {
            "base": "din",
            "token_len": 256,
            "token_dim": 32,
            "side_dim": 16,
            "encoder_layers": 0,
            "source": {"scheme": "user", "epochs": 1, "hidden": [256, 128]},
        },
    ),
    "sif-isolated": (
        "SIF (isolate_target)",
        "sif",
        {"hgaq": {"fields_per_token": 4}, "width": 32, "blocks": 2, "heads": 4, "isolate_target": True},
    ),
    "sif": ("SIF", "sif", {"hgaq": {"fields_per_token": 4}, "width": 32, "blocks": 2, "heads": 4}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/ml-100k", help="a MovieLens or KuaiRand folder")
    ap.add_argument("--kind", default="movielens", choices=["movielens", "kuairand"])
    ap.add_argument("--out", default="runs/bench-serve")
    ap.add_argument("--models", default="iat,sif-isolated,sif")
    ap.add_argument("--backends", default="local,redis")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=400, help="per model and backend (all clients together)")
    ap.add_argument("--seconds", type=float, default=60.0, help="at most this long per model and backend")
    ap.add_argument(
        "--users",
        type=int,
        default=16,
        help="clients act as this many users (so appended events land in later requests' histories)",
    )
    ap.add_argument("--event-share", type=float, default=0.2, help="share of requests that are /events")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--hist-len", type=int, default=256)
    ap.add_argument("--sweep", default="1,10,100,1000", help="candidates per request for the cost sweep")
    ap.add_argument("--sweep-requests", type=int, default=20)
    a = ap.parse_args()

    from sampletok.store.redis import local_redis_server

    out = Path(a.out)
    ds, frame = _dataset(a, out)
    runs = {m: _trained(ds, m, a.hist_len, out) for m in a.models.split(",")}
    rows: list[str] = []
    sweep: list[str] = []
    failed = False
    with tempfile.TemporaryDirectory() as tmp, local_redis_server(tmp) as redis_url:
        for m, run in runs.items():
            for backend in a.backends.split(","):
                store = str(Path(tmp) / f"store-{m}") if backend == "local" else f"{redis_url}?store=bench-{m}"
                with _service(ds, run, store) as url:
                    row, ok = _load(a, ds, frame, url, store, MODELS[m][0], backend)
                    rows.append(row)
                    failed |= not ok
                    if backend == a.backends.split(",")[0]:
                        sweep.append(_sweep(a, ds, frame, url, MODELS[m][0]))
    print(f"\n### Load test: {a.clients} clients, {a.candidates} candidates per /score, L = {a.hist_len}, ")
    print(f"{a.event_share:.0%} /events (loopback, {os.cpu_count()} cores shared by service and clients)\n")
    print("| model | store | requests | req/s | /score P50 ms | /score P99 ms | /events P50 ms | /events P99 ms "
          "| errors | events acked / in store | min history gap s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    sizes = a.sweep.split(",")
    print(f"\n### Cost per candidate (sequential /score, L = {a.hist_len}, {a.backends.split(',')[0]} store)\n")
    print("| model | " + " | ".join(f"N = {n}: P50 ms (ms/candidate)" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    print("\n".join(sweep))
    if failed:
        raise SystemExit("FAILED: an event was lost, a score read the future, or a request failed")


# ---------------------------------------------------------------------------------------------- setup
def _dataset(a, out: Path):
    from sampletok.train.experiment import DatasetConfig, load_dataset

    prepared = out / "prepared" / Path(a.data).name  # one folder per log: a second log never replaces the first
    ds = load_dataset(DatasetConfig(kind=a.kind, path=a.data, prepared_dir=str(prepared))).load_into_memory()
    if a.kind == "movielens":
        from sampletok.data.sources.movielens import load_movielens

        frame = load_movielens(a.data)[0].frame
    else:
        from sampletok.data.sources.kuairand import load_kuairand

        frame = load_kuairand(a.data)[0].frame
    if frame.height != ds.n_rows and ds.schema.duplicates == "keep_first":  # prepare kept each first copy
        s = ds.schema
        key = [s.instance_id] if s.instance_id else [c for c in (s.user, s.item, s.timestamp) if c]
        frame = frame.unique(subset=key, keep="first", maintain_order=True)
    if frame.height != ds.n_rows:
        raise SystemExit(f"{a.data}: the raw log has {frame.height} rows, the prepared one {ds.n_rows}")
    return ds, frame


def _trained(ds, key: str, hist_len: int, out: Path) -> Path:
    from sampletok.train.experiment import ModelSpec, run_model
    from sampletok.train.trainer import TrainConfig

    _, name, params = MODELS[key]
    run = out / "runs" / ds.fingerprint / key  # trained on this log
    if not (run / "model.pt").exists():
        if name == "iat":
            params = {**params, "cache_dir": str(out / "iat-cache")}
        cfg = TrainConfig(max_epochs=1, hist_len=hist_len, train_recent_fraction=0.02, batch_size=256)
        print(f"training {key} briefly (latency only) ...", flush=True)
        run_model(ds, ModelSpec(name=name, params=params), cfg, 2021, run_dir=run, progress=True)
    return run


class _service:
    """`sampletok serve` in its own process on a free loopback port, with a fresh store."""

    def __init__(self, ds, run: Path, store: str):
        # the no-future check reads each reply's history gap: a trusted caller
        self.args = ["--data", str(ds.root), "--run", str(run), "--store", store, "--reset", "--expose-history-gap"]

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "sampletok.cli", "serve", *self.args, "--port", str(port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        import httpx

        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the service exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    return url
            except httpx.TransportError:
                time.sleep(0.2)
        raise SystemExit("the service did not start in 300 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------- traffic
class _Clock:
    """One non-decreasing time for every client, after the log's last event: one tick per two calls, so an
    event and a request often share a timestamp (a `<=` where `<` belongs would show as a zero gap)."""

    def __init__(self, start: int):
        self.n, self.start, self.lock = 0, start, threading.Lock()

    def next(self) -> int:
        with self.lock:
            self.n += 1
            return self.start + self.n // 2


def _bodies(ds):
    """(schema, item fields, the other request fields but the user): how a raw row splits into a request."""
    s = ds.schema
    item_fields = [f.name for f in s.features if f.group == "item"]
    other = [f.name for f in s.features if f.group != "item" and f.name != s.user]
    return s, item_fields, other


def _load(a, ds, frame, url: str, store: str, label: str, backend: str) -> tuple[str, bool]:
    import httpx

    from sampletok.features import FeatureLayout
    from sampletok.serving.events import EventCodec, open_events
    from sampletok.serving.scorer import Scorer, store_location

    s, item_fields, other = _bodies(ds)
    rng = np.random.default_rng(0)
    clock = _Clock(int(np.asarray(ds.col("_ts")).max()) + 1)
    users = frame[s.user].unique().sort().to_list()[: a.users]
    items = frame.unique(subset=[s.item], keep="first", maintain_order=True).select(item_fields).to_dicts()
    picks = rng.integers(0, frame.height, a.requests)
    kinds = rng.random(a.requests) < a.event_share
    lat: dict[str, list[float]] = {"/score": [], "/events": []}
    acked: dict[object, int] = {}
    errors, min_gap = [], [np.inf]
    lock = threading.Lock()
    next_i = [0]
    t_end = time.time() + a.seconds

    def client() -> None:
        http = httpx.Client(base_url=url, timeout=30)
        crng = np.random.default_rng(threading.get_ident() % 2**32)
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= a.requests or time.time() > t_end:
                return
            row = frame.row(int(picks[i]), named=True)
            user = users[int(crng.integers(len(users)))]
            ctx = {k: row[k] for k in other}
            if kinds[i]:
                fields = {**ctx, **{k: row[k] for k in item_fields}}
                body = {"user": user, "ts": clock.next(), "fields": fields,
                        "responses": {r: row[r] for r in s.response_names}}  # fmt: skip
                path = "/events"
            else:
                cands = [items[j] for j in crng.integers(0, len(items), a.candidates)]
                body, path = {"user": user, "ts": clock.next(), "context": ctx, "candidates": cands}, "/score"
            t0 = time.perf_counter()
            r = http.post(path, json=body)
            dt = time.perf_counter() - t0
            with lock:
                if r.status_code != 200:
                    errors.append(f"{path} {r.status_code} {r.text[:200]}")
                    continue
                lat[path].append(dt)
                if path == "/events":
                    acked[user] = acked.get(user, 0) + 1
                else:
                    gap = r.json()["history"]["min_gap_s"]  # the fetched history's own gaps, as the model read it
                    min_gap[0] = min(min_gap[0], gap if gap is not None else np.inf)

    first = frame.row(0, named=True)
    warm = {"user": users[0], "context": {k: first[k] for k in other}, "candidates": items[: a.candidates]}
    for _ in range(3):  # warm-up (first-request allocations)
        httpx.post(url + "/score", json={**warm, "ts": clock.next()}, timeout=60)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    # nothing lost: a fresh reader counts each user's events
    events = open_events(store_location(store, "events"), ds.fingerprint, EventCodec(FeatureLayout.from_dataset(ds)))
    keys = {u: Scorer.user_key(u) for u in acked}
    base = dict(zip(*np.unique(np.asarray(ds.col("_user_key")), return_counts=True), strict=True))
    far = np.full(len(keys), np.iinfo(np.int64).max // 2)
    n_max = int(max(base.values())) + max(acked.values(), default=0) + 1
    f = events.fetch(np.array(list(keys.values()), np.int64), far, n_max, dequantize=False)
    in_store = f.mask.sum(1) - np.array([base.get(k, 0) for k in keys.values()])
    n_acked = sum(acked.values())
    lost = int((np.array(list(acked.values())) - in_store).clip(0).sum()) if acked else 0
    done = len(lat["/score"]) + len(lat["/events"])

    def pct(xs: list[float], q: float) -> str:
        return f"{np.percentile(xs, q) * 1e3:.1f}" if xs else "-"

    ok = "ok" if lost == 0 else f"LOST {lost}"
    gap = "ok" if min_gap[0] > 0 else f"LEAK {min_gap[0]}"
    if errors:
        print("errors:", *errors[:5], sep="\n  ")
    good = lost == 0 and min_gap[0] > 0 and not errors
    return (
        f"| {label} | {backend} | {done} | {done / wall:.1f} | {pct(lat['/score'], 50)} | {pct(lat['/score'], 99)} "
        f"| {pct(lat['/events'], 50)} | {pct(lat['/events'], 99)} | {len(errors)} "
        f"| {n_acked} / {int(in_store.sum()) if acked else 0} ({ok}) | {min_gap[0]:.0f} ({gap}) |"
    ), good


def _sweep(a, ds, frame, url: str, label: str) -> str:
    import httpx

    s, item_fields, other = _bodies(ds)
    items = frame.unique(subset=[s.item], keep="first", maintain_order=True).select(item_fields).to_dicts()
    row = frame.row(0, named=True)
    ctx = {k: row[k] for k in other}
    ts = int(np.asarray(ds.col("_ts")).max()) + 10**6
    cells = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for n in (int(x) for x in a.sweep.split(",")):
            cands = [items[i % len(items)] for i in range(n)]
            body = {"user": row[s.user], "ts": ts, "context": ctx, "candidates": cands}
            http.post("/score", json=body)
            times = []
            for _ in range(a.sweep_requests):
                t0 = time.perf_counter()
                r = http.post("/score", json=body)
                times.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
            p50 = float(np.median(times)) * 1e3
            cells.append(f"{p50:.1f} ({p50 / n:.3f})")
    return f"| {label} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
