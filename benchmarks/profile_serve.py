"""Where a /score request's time goes, in process: JSON parse, request validation, row checks, encoding, the
store fetch, batch assembly, the forward, and the reply (and, beside the encoding, the baseline of encoding every
candidate as a full row, with its ratio) — for one 100-candidate request, and per request when
G requests share one forward (the dynamic batcher's ``Scorer.score_many``).

It uses the models ``bench_serve.py`` trained (run it first; same ``--out``) over a fresh local store.

Run: python benchmarks/profile_serve.py --data ../shared/data/ml-100k [--models iat,sif-isolated] [--groups 1,4,8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_serve import MODELS, _dataset, _traffic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/ml-100k")
    ap.add_argument("--kind", default="movielens", choices=["movielens", "kuairand"])
    ap.add_argument("--out", default="runs/bench-serve")
    ap.add_argument("--models", default="iat,sif-isolated")
    ap.add_argument("--groups", default="1,4,8", help="requests per forward")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--event-share", type=float, default=0.0)
    ap.add_argument("--hist-len", type=int, default=256)
    a = ap.parse_args()

    from sampletok.serving.app import ScoreRequest
    from sampletok.serving.scorer import ScoreQuery, Scorer

    ds, frame = _dataset(a, Path(a.out))
    ts = int(np.asarray(ds.col("_ts")).max()) + 1
    bodies = [b["body"] for b in _traffic(a, ds, frame, 64, seed=7)]
    raw = [json.dumps({**b, "ts": ts}).encode() for b in bodies]
    print(f"\n### Where a /score request's time goes (in process, {a.candidates} candidates, L = {a.hist_len}, "
          f"local store, {torch.get_num_threads()} threads)\n")  # fmt: skip
    head = "| model | requests per forward | parse ms | validate ms | row checks ms | encode ms | fetch ms "
    print(head + "| batch ms | forward ms | reply ms | total ms per request | encode as full rows ms (ratio) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in a.models.split(","):
        run = Path(a.out) / "runs" / ds.fingerprint / m
        if not (run / "model.pt").exists():
            raise SystemExit(f"{run}: run benchmarks/bench_serve.py first (it trains the models)")
        with tempfile.TemporaryDirectory() as tmp:
            scorer = Scorer.from_run(ds, run, Path(tmp) / "store")
            for g in (int(x) for x in a.groups.split(",")):
                print(_profile(scorer, raw, g, a.repeats, MODELS[m][0], ScoreRequest, ScoreQuery))


@torch.no_grad()
def _profile(scorer, raw: list[bytes], g: int, repeats: int, label: str, request_model, query_type) -> str:
    stages: dict[str, list[float]] = {k: [] for k in ("parse", "validate", "rows", "encode", "fetch", "batch")}
    stages.update(forward=[], reply=[])
    fetched: list[float] = []
    full_encode: list[float] = []
    scorer.on_fetch = fetched.append
    for r in range(repeats + 2):  # two warm-up rounds
        group = [raw[(r * g + i) % len(raw)] for i in range(g)]
        t = [time.perf_counter()]
        parsed = [json.loads(b) for b in group]
        t.append(time.perf_counter())
        reqs = [request_model.model_validate(p) for p in parsed]
        t.append(time.perf_counter())
        checked = [scorer._checked(query_type(q.user, q.ts, q.context, q.candidates)) for q in reqs]
        t.append(time.perf_counter())
        _, enc = scorer.encode_together([(i, k, rr) for i, (k, rr) in enumerate(checked)], [None] * g)
        t.append(time.perf_counter())
        # the baseline beside it: every candidate encoded as a full row (what the service did before)
        full = [row for _, rr in checked for row in scorer._full_rows(rr)]
        t0 = time.perf_counter()
        scorer.encoder.encode(full, origin="request")
        full_encode.append((time.perf_counter() - t0) / g)
        keys = np.array([k for k, _ in checked])
        times = np.array([q.ts for q in reqs])
        sizes = [len(q.candidates) for q in reqs]
        fetched.clear()
        batch = scorer._batch(enc, keys, times, sizes, scorer.hist_len, scorer.model.reads_history_samples, True)
        t.append(time.perf_counter())
        p = scorer.model.calibrated(scorer.model(batch).logits[:, 0].double().numpy())
        t.append(time.perf_counter())
        start = 0
        for n in sizes:
            json.dumps({"scores": p[start : start + n].tolist(), "ts": 0, "history": {"events": 1}})
            start += n
        t.append(time.perf_counter())
        if r < 2:
            continue
        d = np.diff(t)
        for name, dt in zip(("parse", "validate", "rows", "encode"), d[:4], strict=True):
            stages[name].append(dt / g)
        stages["fetch"].append(sum(fetched) / g)
        stages["batch"].append((d[4] - sum(fetched)) / g)
        stages["forward"].append(d[5] / g)
        stages["reply"].append(d[6] / g)
    med = {k: float(np.median(v)) * 1e3 for k, v in stages.items()}
    cells = " | ".join(f"{med[k]:.2f}" for k in stages)
    full_ms = float(np.median(full_encode[2:])) * 1e3
    return f"| {label} | {g} | {cells} | {sum(med.values()):.1f} | {full_ms:.2f} ({full_ms / med['encode']:.1f}x) |"


if __name__ == "__main__":
    main()
