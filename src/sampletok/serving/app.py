"""The scoring service (``sampletok serve``; ``pip install 'sampletok[serve]'``): FastAPI over a
:class:`~sampletok.serving.scorer.Scorer`.

* ``POST /score`` ``{user, ts?, context, candidates: [...]}`` → ``{"scores": [...], "ts", "history"}``, one
  calibrated probability per candidate; ``ts`` defaults to now (in the log's timestamp unit); ``history``
  says how many past events (and tokens) were read (and, only with ``expose_history_gap``, the most recent
  one's age ``min_gap_s``: it reveals a user's event times, so it is for trusted callers).
* ``POST /events`` ``{user, ts, fields, responses?, known_at?, event_id?}`` → ``{"instance_id", "duplicate"}``:
  the event and its token are in the stores, committed together, when the reply comes (visible to requests
  after ``ts``, its responses once known). With ``event_id`` a retry stores nothing and answers the first
  instance id with ``"duplicate": true``; another event under a used ``event_id`` is 409.
* ``PATCH /events/{event_id}`` ``{user, responses, known_at?}`` → ``{"instance_id", "updated"}``: responses
  of a stored event learned later (a purchase days after the click), each visible to requests after its
  ``known_at`` (default now; never before the event), in the event and token stores together; 404 when the
  user has no event with that id.
* ``GET /schema``: the fields a request holds (type, group, frequent values) and a valid example body.
* ``GET /healthz`` (503 when the store cannot be read), ``GET /metrics`` (Prometheus text: requests and
  errors per endpoint, request latency and store-fetch histograms, appended events).

A bad request gets a 4xx reply whose body is one JSON line ``{"error": "..."}`` naming the field: 422 for a
malformed body, 400 for values the schema refuses (unknown field, too many candidates, a missing user), 401
without the bearer token when one is set (``--token-file``; ``/healthz`` stays open), 413 for a body over
``max_body_bytes``, 404/405 for an unknown path or method; 503 when the store is unreachable. Nothing
answers with a traceback: an unexpected failure is logged and answered ``500 {"error": "internal error
(<type>)"}``.

Concurrent /score requests are grouped by a dynamic batcher (:mod:`sampletok.serving.batcher`: at most
``max_batch_candidates`` candidates, waiting at most ``max_wait_us`` for more) into one model forward on one
worker thread, off the event loop; each request keeps its own history. ``max_batch_candidates="auto"`` (the
default) times the model at start on a probe request alone and in groups, and batches across requests only
where a shared forward scores a request faster (GET /healthz and /metrics say what it chose). Appends run on
the same thread in queue order (the local store's append never races its readers). A full queue
(``max_queue``) answers 503 with ``Retry-After: 1``. Several processes (``workers``) need a Redis store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from sampletok.errors import ConflictError, NotFoundError, SampletokError, StoreError, one_line
from sampletok.serving.batcher import Batcher, Overloaded, calibrate_batch_candidates
from sampletok.serving.config import ServingConfig
from sampletok.serving.scorer import ScoreQuery, Scorer

log = logging.getLogger("sampletok.serve")


class ScoreRequest(BaseModel):
    """The body of POST /score."""

    model_config = ConfigDict(extra="forbid")
    user: StrictStr | StrictInt
    ts: StrictInt | None = Field(
        None, ge=-(2**62), le=2**62, description="request time in the log's unit (default: now)"
    )
    context: dict[str, Any] = Field(default_factory=dict, description="the request's own fields")
    candidates: list[dict[str, Any]] = Field(min_length=1, description="each candidate's item fields")


class LateResponsesRequest(BaseModel):
    """The body of PATCH /events/{event_id}: responses of a stored event learned after it."""

    model_config = ConfigDict(extra="forbid")
    user: StrictStr | StrictInt
    responses: dict[str, Any] = Field(min_length=1)
    known_at: dict[str, Annotated[StrictInt, Field(ge=-(2**62), le=2**62)]] = Field(
        default_factory=dict, description="when each became known (default: now)"
    )


class EventRequest(BaseModel):
    """The body of POST /events."""

    model_config = ConfigDict(extra="forbid")
    user: StrictStr | StrictInt
    ts: StrictInt = Field(ge=-(2**62), le=2**62)
    fields: dict[str, Any]
    responses: dict[str, Any] = Field(default_factory=dict)
    known_at: dict[str, Annotated[StrictInt, Field(ge=-(2**62), le=2**62)]] = Field(default_factory=dict)
    event_id: StrictStr | None = Field(
        None, min_length=1, max_length=128, description="the client's id of the event: a retry is stored once"
    )


# a high surrogate escape not followed by a low one, or a low one not preceded by a high one
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def create_app(scorer: Scorer, config: ServingConfig | None = None) -> Any:
    """The FastAPI app serving ``scorer`` under ``config`` (its limits, token and reply options)."""
    import hmac

    cfg = config or ServingConfig()
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, Response
        from prometheus_client import (
            CONTENT_TYPE_LATEST,
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            generate_latest,
        )
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError as e:
        raise SampletokError(f"the service needs the serve extra (pip install 'sampletok[serve]'): {e}") from None

    registry = CollectorRegistry()
    requests = Counter(
        "sampletok_requests", "requests by endpoint and status", ["endpoint", "status"], registry=registry
    )
    latency = Histogram(
        "sampletok_request_seconds", "request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry
    )
    fetch = Histogram(
        "sampletok_store_fetch_seconds", "history fetch time (event + token store)", buckets=LATENCY_BUCKETS,
        registry=registry,
    )  # fmt: skip
    candidates = Counter("sampletok_candidates", "candidates scored", registry=registry)
    appended = Counter("sampletok_events_appended", "events appended", registry=registry)
    batch_requests = Histogram(
        "sampletok_batch_requests", "requests per model forward (dynamic batching)",
        buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry,
    )  # fmt: skip
    queue_wait = Histogram(
        "sampletok_queue_seconds", "time a batch's oldest request waited in the queue", buckets=LATENCY_BUCKETS,
        registry=registry,
    )  # fmt: skip
    overloaded = Counter("sampletok_overloaded", "requests refused for a full queue (503)", registry=registry)

    def on_batch(n_requests: int, _: int, waited: float) -> None:
        batch_requests.observe(n_requests)
        queue_wait.observe(waited)

    scorer.warm_up()  # an event's one-time costs now, not in the first client's latency
    max_batch = cfg.max_batch_candidates
    if max_batch == "auto":  # this model, on this process's threads and store: does a shared forward pay?
        size = min(cfg.probe_candidates, scorer.max_candidates)
        probe = scorer.probe_query(size)
        first = scorer.score_many([probe])[0]
        if isinstance(first, Exception):  # a schema whose example request is refused: no cross-request batching
            max_batch = size
            log.warning("auto batching: the probe request was refused (%s); max_batch_candidates %d (one "
                        "request's)", one_line(str(first)), size)  # fmt: skip
        else:
            if first[1]["events"] == 0:
                log.warning("auto batching: the probe user has no history, so the timing reads none (set a number)")
            max_batch, per_request = calibrate_batch_candidates(scorer.score_many, probe, size)
            timings = ", ".join(f"{g}: {t * 1e3:.1f} ms" for g, t in per_request.items())
            log.warning("auto batching: max_batch_candidates %d (per %d-candidate request by group: %s)",
                        max_batch, size, timings)  # fmt: skip
    Gauge("sampletok_max_batch_candidates", "the batcher's most candidates per forward", registry=registry).set(
        max_batch
    )
    scorer.on_fetch = fetch.observe  # after the probe: the histogram counts requests' fetches only
    batcher = Batcher(
        scorer.score_many,
        max_batch_candidates=max_batch,
        max_wait_us=cfg.max_wait_us,
        max_queue=cfg.max_queue,
        on_batch=on_batch,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: Any):
        yield
        batcher.close()

    app = FastAPI(title="sampletok", summary=f"{type(scorer.model).__name__} scoring service", lifespan=lifespan)
    app.state.batcher = batcher

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": one_line(message)}, status_code=status)

    guarded = ("/score", "/events", "/schema")  # and every /events/{id}
    expected = f"Bearer {cfg.token}".encode() if cfg.token else None

    async def checked(request: Request) -> JSONResponse | None:
        """The reply refusing a request before it is parsed (token, body size), or None."""
        if expected is not None and (request.url.path in guarded or request.url.path.startswith("/events/")):
            got = request.headers.get("authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(got, expected):  # constant time: the token is never guessed bytewise
                return error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            return error(413, f"request body over {cfg.max_body_bytes} bytes")
        if request.method in ("POST", "PUT", "PATCH"):
            body = await request.body()  # cached by starlette for the endpoint; a chunked body is counted too
            if len(body) > cfg.max_body_bytes:
                return error(413, f"request body over {cfg.max_body_bytes} bytes")
            if b"\\u" in body and _LONE_SURROGATE.search(body):  # valid JSON, but no text: never a 500 later
                return error(400, "request body holds a lone UTF-16 surrogate escape (not valid Unicode)")
        return None

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        try:
            response = await checked(request) or await call_next(request)
        except Exception as e:  # never a traceback to the client
            log.exception("unexpected error")
            response = error(500, f"internal error ({type(e).__name__})")
        path = request.url.path
        if path in ("/score", "/events", "/healthz"):
            latency.labels(path).observe(time.perf_counter() - t0)
            requests.labels(path, str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        message = json.dumps(first.get("msg", "invalid"), ensure_ascii=True)[1:-1]  # no raw surrogate in a reply
        return error(422, f"request field '{where}': {message}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405, bad JSON bodies
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Overloaded)
    async def full(_: Request, exc: Overloaded) -> JSONResponse:
        overloaded.inc()
        reply = error(503, str(exc))
        reply.headers["Retry-After"] = "1"
        return reply

    @app.exception_handler(StoreError)
    async def store_down(_: Request, exc: StoreError) -> JSONResponse:
        return error(503, str(exc))

    @app.exception_handler(NotFoundError)
    async def not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(ConflictError)
    async def conflict(_: Request, exc: ConflictError) -> JSONResponse:
        return error(409, str(exc))

    @app.exception_handler(SampletokError)
    async def refused(_: Request, exc: SampletokError) -> JSONResponse:
        return error(400, str(exc))

    @app.post("/score")
    async def score(req: ScoreRequest) -> dict:
        ts = req.ts if req.ts is not None else int(time.time() * scorer.schema.ticks_per_second)
        query = ScoreQuery(req.user, ts, req.context, req.candidates)
        scores, history = await batcher.score(query, size=len(req.candidates))
        if not cfg.expose_history_gap:
            history.pop("min_gap_s", None)
        candidates.inc(len(scores))
        return {"scores": scores.tolist(), "ts": ts, "history": history}

    @app.post("/events")
    async def events(req: EventRequest) -> dict:
        iid, stored = await batcher.run(
            lambda: scorer.append_event(req.user, req.ts, req.fields, req.responses, req.known_at, req.event_id)
        )
        if stored:
            appended.inc()
        return {"instance_id": iid, "duplicate": not stored}

    @app.patch("/events/{event_id}")
    async def late_responses(event_id: str, req: LateResponsesRequest) -> dict:
        iid = await batcher.run(lambda: scorer.add_late_responses(event_id, req.user, req.responses, req.known_at))
        return {"instance_id": iid, "updated": True}

    @app.get("/healthz", response_model=None)  # a Response: no model (and no forward ref to resolve)
    async def healthz() -> Response:
        one = np.zeros(1, np.int64)
        try:  # one store round trip, in queue order but never refused for a full queue
            await batcher.run(lambda: scorer.fetch_history(one, one, 1), bounded=False)
        except StoreError as e:
            return error(503, str(e))
        model, batch = type(scorer.model).__name__.lower(), batcher.max_batch_candidates
        return JSONResponse({"status": "ok", "model": model, "process": os.getpid(), "max_batch_candidates": batch})

    @app.get("/schema")
    def schema() -> dict:
        return scorer.describe()

    @app.get("/metrics", response_model=None)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


WORKER_ENV = "SAMPLETOK_SERVE_WORKER"  # what `sampletok serve --workers N` hands each worker process


def worker_spec(data: str | Path, run: str | Path, config: ServingConfig, token_file: str | Path | None) -> str:
    """The JSON a worker process reads to build its app (the token by its file, never in the environment)."""
    spec: dict[str, Any] = {"data": str(data), "run": str(run), "config": config.model_dump(exclude={"token"})}
    spec["token_file"] = None if token_file is None else str(Path(token_file).resolve())
    return json.dumps(spec)


def worker_app() -> Any:
    """The app of one of several service processes (uvicorn's factory): its own scorer over the Redis store
    the parent made, its own batcher."""
    from sampletok.data.dataset import PreparedDataset
    from sampletok.serving.config import read_token_file

    spec = json.loads(os.environ[WORKER_ENV])
    token = read_token_file(spec["token_file"]) if spec["token_file"] else None
    cfg = ServingConfig(**{**spec["config"], "token": token})
    scorer = Scorer.from_run(PreparedDataset(spec["data"]), spec["run"], cfg.store, max_candidates=cfg.max_candidates)
    settle_process(cfg)
    return create_app(scorer, cfg)


def settle_process(cfg: ServingConfig) -> None:
    """What a service process sets once its model and stores are loaded: ``cfg.threads`` torch threads (the
    event loop, the batcher and other processes share the cores; scale out with workers), and the loaded
    objects moved out of the garbage collector's reach (``gc.freeze``), so a collection scans only
    per-request objects."""
    import gc

    import torch

    torch.set_num_threads(cfg.threads)
    gc.collect()
    gc.freeze()
