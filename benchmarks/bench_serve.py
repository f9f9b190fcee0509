"""Open-loop load test of the scoring service on loopback: POST /score (100 candidates, history L = 256)
mixed with POST /events at fixed offered rates against `sampletok serve` with a local and a Redis store.

For each model × backend it starts the service in its own process (a fresh store made from the dataset) and,
for each offered rate, runs the load generator (``benchmarks/loadgen.py``) in another process: Poisson
arrivals at that rate, whatever the replies do (open loop, so queueing shows), each latency from the
request's scheduled time. It prints per rate the P50/P99/P99.9 of /score, the throughput answered, refusals
(503 from the bounded queue) and errors; the saturation point is the highest rate whose answered throughput
keeps up with the offered one and whose P99 stays within the target. Then it checks that

* every acknowledged event is in the store (a fresh reader counts each user's events: the dataset's rows
  plus the acknowledged appends, nothing lost), and
* no score read history at or after its request time (each reply reports its history's smallest gap, which
  must be > 0; requests and events draw their times from one clock, so an event is in one request's past
  and another's future; an event and a request often share a timestamp).
  The exit status is 1 when an event is lost, a score read the future or a request failed (not a 503).

Also printed: the sequential latency of the same 100-candidate request (one client, one at a time) and the
cost per candidate as a request grows (1, 10, 100, 1000 candidates).

The models are trained briefly here (1 epoch on the latest 2 % of the training requests; cached under
``--out``): latency does not depend on how well a model ranks. DIN + IAT (user-order source, 256 tokens,
item-ID history 256), SIF at L = 256 (``isolate_target``: one history pass per request) and, for contrast,
SIF as trained by default (its history pass runs once per candidate).

Run: python benchmarks/bench_serve.py --data ../shared/data/ml-100k [--rates 10,20,40,80] [--seconds 20]
     [--models iat,sif-isolated] [--backends local,redis] [--serve-args "--max-wait-us 2000"]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
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
    ap.add_argument("--rates", default="10,20,40,80", help="offered requests per second (all paths together)")
    ap.add_argument("--seconds", type=float, default=20.0, help="load per rate")
    ap.add_argument("--target-ms", default="iat=20,sif-isolated=50,sif=50", help="/score P99 targets per model")
    ap.add_argument("--serve-args", default="", help="extra `sampletok serve` options (batching, workers)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured /score load before each rate")
    ap.add_argument(
        "--users",
        type=int,
        default=16,
        help="requests act as this many users (so appended events land in later requests' histories)",
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
    targets = {k: float(v) for k, v in (x.split("=") for x in a.target_ms.split(","))}
    tables: list[str] = []
    sweep: list[str] = []
    failed = False
    with tempfile.TemporaryDirectory() as tmp, local_redis_server(tmp) as redis_url:
        for m, run in runs.items():
            for backend in a.backends.split(","):
                store = str(Path(tmp) / f"store-{m}") if backend == "local" else f"{redis_url}?store=bench-{m}"
                with _service(ds, run, store, a.serve_args.split()) as url:
                    import httpx

                    batch = httpx.get(url + "/healthz", timeout=10).json().get("max_batch_candidates")
                    label = f"{MODELS[m][0]} (max_batch_candidates {batch})"
                    seq = _sequential(a, ds, frame, url)
                    table, ok = _open_loop(a, ds, frame, url, store, label, backend, seq, targets.get(m))
                    tables.append(table)
                    failed |= not ok
                    if backend == a.backends.split(",")[0]:
                        sweep.append(_sweep(a, ds, frame, url, MODELS[m][0]))
    print(f"\n### Open-loop load: {a.candidates} candidates per /score, L = {a.hist_len}, ", end="")
    print(f"{a.event_share:.0%} /events, ", end="")
    print(
        f"{a.seconds:.0f} s per rate after {a.warmup:g} s of unmeasured /score at the same rate (loopback, "
        f"{os.cpu_count()} cores shared by service and load generator)"
    )
    print(f"service options: {a.serve_args or '(defaults)'}\n")
    print("\n\n".join(tables))
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

    def __init__(self, ds, run: Path, store: str, extra: list[str] | None = None):
        # the no-future check reads each reply's history gap: a trusted caller
        self.args = ["--data", str(ds.root), "--run", str(run), "--store", store, "--reset", "--expose-history-gap"]
        self.args += extra or []

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
def _bodies(ds):
    """(schema, item fields, the other request fields but the user): how a raw row splits into a request."""
    s = ds.schema
    item_fields = [f.name for f in s.features if f.group == "item"]
    other = [f.name for f in s.features if f.group != "item" and f.name != s.user]
    return s, item_fields, other


def _traffic(a, ds, frame, n: int, seed: int) -> list[dict]:
    """``n`` request bodies: /score of a random user among ``--users`` with ``--candidates`` random items, and
    a share of /events (a random logged row's fields and responses, as one of those users)."""
    s, item_fields, other = _bodies(ds)
    rng = np.random.default_rng(seed)
    users = frame[s.user].unique().sort().to_list()[: a.users]
    items = frame.unique(subset=[s.item], keep="first", maintain_order=True).select(item_fields).to_dicts()
    out = []
    for i in range(n):
        row = frame.row(int(rng.integers(frame.height)), named=True)
        user, ctx = users[int(rng.integers(len(users)))], {k: row[k] for k in other}
        if rng.random() < a.event_share:
            fields = {**ctx, **{k: row[k] for k in item_fields}}
            body = {"user": user, "ts": 0, "fields": fields, "responses": {r: row[r] for r in s.response_names}}
            body["event_id"] = f"bench-{seed}-{i}"
            out.append({"path": "/events", "body": body})
        else:
            cands = [items[j] for j in rng.integers(0, len(items), a.candidates)]
            out.append({"path": "/score", "body": {"user": user, "ts": 0, "context": ctx, "candidates": cands}})
    return out


def _sequential(a, ds, frame, url: str, n: int = 40) -> float:
    """P50 seconds of one 100-candidate /score at a time (no concurrency): the latency batching is judged by."""
    import httpx

    bodies = [b["body"] for b in _traffic(a, ds, frame, 200, seed=99) if b["path"] == "/score"][:n]
    ts = int(np.asarray(ds.col("_ts")).max()) + 1
    times = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for body in [bodies[0]] * 3 + bodies:  # three warm-up requests
            t0 = time.perf_counter()
            r = http.post("/score", json={**body, "ts": ts})
            times.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    return float(np.median(times[3:]))


def _open_loop(a, ds, frame, url, store, label, backend, seq_s, target_ms) -> tuple[str, bool]:
    from sampletok.features import FeatureLayout
    from sampletok.serving.events import EventCodec, open_events
    from sampletok.serving.scorer import Scorer, store_location

    clock = int(np.asarray(ds.col("_ts")).max()) + 10
    acked: dict[object, int] = {}
    min_gap, errors, lines, ok_rates = np.inf, [], [], []
    for k, rate in enumerate(float(r) for r in a.rates.split(",")):
        n = max(int(rate * a.seconds), 1)
        spec = {"url": url, "rate": rate, "seconds": a.seconds, "ts0": clock, "seed": k, "warmup_s": a.warmup}
        spec["bodies"] = _traffic(a, ds, frame, n, seed=1000 + k)
        clock += n  # the next rate's times come after this one's
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(spec, f)
        here = Path(__file__).with_name("loadgen.py")
        cmd = [sys.executable, str(here), f.name]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=a.seconds * 10)
        os.unlink(f.name)
        if done.returncode != 0:
            raise SystemExit(f"the load generator failed: {done.stderr[-2000:]}")
        res = json.loads(done.stdout)
        score = res["paths"].get("/score", {"latency_s": [], "status": {}, "min_gap_s": []})
        lat = np.array(score["latency_s"]) * 1e3
        statuses: dict[str, int] = {}
        for p in res["paths"].values():
            for st, c in p["status"].items():
                statuses[st] = statuses.get(st, 0) + c
        answered = statuses.get("200", 0)
        refused = statuses.get("503", 0)
        failed = sum(c for st, c in statuses.items() if st not in ("200", "503"))
        if failed:
            errors.append(f"rate {rate}: {statuses}")
        for user, _ in res["paths"].get("/events", {}).get("acked", []):
            acked[user] = acked.get(user, 0) + 1
        gaps = [g for g in score["min_gap_s"] if g is not None]
        min_gap = min([min_gap, *gaps])
        thr = answered / res["wall_s"]
        p50, p99, p999 = (np.percentile(lat, q) if len(lat) else np.nan for q in (50, 99, 99.9))
        ev = np.array(res["paths"].get("/events", {}).get("latency_s", [])) * 1e3
        ev50, ev99 = (np.percentile(ev, q) if len(ev) else np.nan for q in (50, 99))
        lag = res["wall_s"] - res["span_s"]  # how long after the last send the last reply came
        keeps_up = refused == 0 and failed == 0 and lag < 1.0
        if keeps_up and (target_ms is None or p99 <= target_ms):
            ok_rates.append(rate)
        lines.append(
            f"| {rate:g} | {thr:.1f} | {p50:.1f} | {p99:.1f} | {p999:.1f} | {p99 / (seq_s * 1e3):.1f}× "
            f"| {ev50:.1f} | {ev99:.1f} | {refused} | {failed} | {lag * 1e3:.0f} | {res['late_s'] * 1e3:.0f} |"
        )
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
    if errors:
        print("errors:", *errors[:5], sep="\n  ")
    good = lost == 0 and min_gap > 0 and not errors
    sat = f"{max(ok_rates):g} req/s" if ok_rates else "below the lowest rate"
    head = (
        f"**{label}, {backend} store** — sequential /score P50 {seq_s * 1e3:.1f} ms; saturation (the last reply "
        f"within 1 s of the last send, no refusal{f', P99 ≤ {target_ms:g} ms' if target_ms else ''}): {sat}; "
        f"events acked / in store {n_acked} / {int(in_store.sum()) if acked else 0} "
        f"({'ok' if lost == 0 else f'LOST {lost}'}); "
        f"min history gap {min_gap:.0f} s ({'ok' if min_gap > 0 else 'LEAK'})\n\n"
        "| offered req/s | answered req/s | /score P50 ms | P99 ms | P99.9 ms | P99 / sequential | /events P50 ms "
        "| P99 ms | 503 | errors | drain ms | client late ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(lines), good


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
