"""An open-loop load generator for the scoring service, run in its own process (``bench_serve.py`` starts it).

Requests leave at a fixed offered rate (Poisson arrivals) whatever the service's replies do, so queueing shows
in the latency instead of slowing the client (a closed loop hides it: a slow reply delays the next request).
Each latency is measured from the request's *scheduled* send time, not from when the client got round to
sending it, so a client that falls behind does not hide the service's delay (coordinated omission).

Input: a JSON file ``{"url", "rate", "seconds", "bodies": [{"path", "body"}...], "timeout", "warmup_s"}``
(``warmup_s``: that long of /score at the same rate first, not measured); the bodies are
sent in turn, each with ``ts`` from one increasing clock ``ts0 + i // 2`` (events and requests interleave in
time and often share a timestamp). Output (stdout, one JSON): per path the
latencies, status counts, acknowledged events and each /score reply's ``min_gap_s``.

Run: python benchmarks/loadgen.py SPEC.json > result.json
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx
import numpy as np


async def run(spec: dict) -> dict:
    rate, seconds = float(spec["rate"]), float(spec["seconds"])
    bodies = spec["bodies"]
    rng = np.random.default_rng(spec.get("seed", 0))
    n = max(int(rate * seconds), 1)
    at = np.cumsum(rng.exponential(1.0 / rate, n))  # Poisson arrivals
    out: dict = {"sent": 0, "late_s": 0.0, "paths": {}}
    limits = httpx.Limits(max_connections=spec.get("connections", 256), max_keepalive_connections=256)
    headers = {"content-type": "application/json", **spec.get("headers", {})}
    encoded = [(b["path"], b["body"]) for b in bodies]
    ts0 = int(spec.get("ts0", 0))

    async with httpx.AsyncClient(base_url=spec["url"], limits=limits, timeout=spec.get("timeout", 30)) as client:

        async def one(i: int, due: float) -> None:
            path, body = encoded[i % len(encoded)]
            body = {**body, "ts": ts0 + i // 2}  # one clock: an event and a request often share a time
            payload = json.dumps(body).encode()
            stats = out["paths"].setdefault(path, {"latency_s": [], "status": {}, "acked": [], "min_gap_s": []})
            try:
                r = await client.post(path, content=payload, headers=headers)
                status, reply = r.status_code, (r.json() if r.status_code == 200 else None)
            except httpx.HTTPError as e:
                status, reply = type(e).__name__, None
            stats["latency_s"].append(time.perf_counter() - due)  # from the scheduled time
            stats["status"][str(status)] = stats["status"].get(str(status), 0) + 1
            if reply is not None and path == "/events":
                stats["acked"].append([body["user"], reply["instance_id"]])
            elif reply is not None:
                stats["min_gap_s"].append(reply["history"].get("min_gap_s"))

        # warm-up, not measured: the same rate of /score only (nothing written) for warmup_s, so the connection
        # pool and the service's first-request costs do not land in a short run's P99
        warm = [b for _, b in encoded if _ == "/score"][:1] if spec.get("warmup_s") else []
        if warm:
            w_at = np.cumsum(rng.exponential(1.0 / rate, max(int(rate * float(spec["warmup_s"])), 1)))
            w_start, w_tasks = time.perf_counter(), []
            for t in w_at:
                await asyncio.sleep(max(w_start + float(t) - time.perf_counter(), 0))
                body = json.dumps({**warm[0], "ts": ts0}).encode()
                w_tasks.append(asyncio.ensure_future(client.post("/score", content=body, headers=headers)))
            await asyncio.gather(*w_tasks, return_exceptions=True)

        start = time.perf_counter()
        tasks = []
        for i, t in enumerate(at):
            due = start + float(t)
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                out["late_s"] = max(out["late_s"], -delay)  # how far the client itself fell behind
            tasks.append(asyncio.ensure_future(one(i, due)))
            out["sent"] += 1
        await asyncio.gather(*tasks)
        out["wall_s"] = time.perf_counter() - start
        out["span_s"] = float(at[-1])  # the last scheduled send: the service kept up if it finished soon after
    return out


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    json.dump(asyncio.run(run(spec)), sys.stdout)


if __name__ == "__main__":
    main()
