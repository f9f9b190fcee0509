"""The online scorer: a trained run, its fitted encoder and the stores, answering raw requests and events.

A request ``(user, ts, context, candidates)`` is scored in one pass: its N rows (the request's fields with
each candidate's) are encoded with the dataset's fitted :class:`~sampletok.data.encoder.Encoder`; the user's
history is fetched **once** from the event store (and the model's token store, for IAT tokens or SIF codes),
strictly before ``ts``, with responses only once known; the :class:`~sampletok.features.Batch` the model was
trained on is built with that one history shared by the N rows (``Batch.history_group``: an isolated SIF runs
its history pass once) and the calibrated probability of the first task label comes back per candidate —
the same number offline ``evaluate`` gives for the same row (tested on ml-100k's test rows).

An event ``(user, ts, fields, responses)`` is encoded the same way and appended to the event store; an IAT
model's source model embeds it (from its own features and its history in the event store) into the token
store, a SIF code store gets its codes. It becomes visible only to requests after ``ts``, each response only
once known (the schema's delay, a given ``known_at``; a response not given is never visible).

Users are keyed by the stable hash of their raw id (:func:`~sampletok.data.cells.user_keys`): an unknown
user has an empty history, and unknown values encode as OOV.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from sampletok.columns import NEVER, known_col, label_col, resp_col
from sampletok.data.batches import FetchedHistory, RequestRows, TokenSource, build_batch
from sampletok.data.cells import user_keys
from sampletok.data.dataset import PreparedDataset
from sampletok.data.encoder import Encoder
from sampletok.errors import ConfigError, DataError, StoreError
from sampletok.features import Batch, FeatureLayout
from sampletok.models.base import RankingModel
from sampletok.serving.events import EventCodec, export_events, open_events
from sampletok.store.base import Fetched, Instances, LateResponses, TokenStore
from sampletok.store.local import LocalTokenStore
from sampletok.store.locations import (
    append_together,
    create_store,
    is_redis_url,
    open_store,
    store_exists,
    update_responses_together,
)
from sampletok.tokens import EventTokenizer, token_method


def store_location(base: str | Path, part: str) -> str:
    """Where one of the service's stores lives under ``--store``: ``DIR/part``, or for a Redis URL the store
    named ``PREFIX:part`` (``PREFIX`` from ``?store=``, default ``sampletok``)."""
    text = str(base)
    if not is_redis_url(text):
        return str(Path(text) / part)
    from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

    u = urlsplit(text)
    q = {k: v[0] for k, v in parse_qs(u.query).items()}
    q["store"] = f"{q.get('store', 'sampletok')}:{part}"
    return urlunsplit(u._replace(query=urlencode(q)))


def copy_tokens(src: LocalTokenStore, location: str, before_ts: int | None = None) -> TokenStore:
    """A copy of a local token store (its instances with ``ts < before_ts``, or all) at ``location``: the
    service appends to its own copy, never to an experiment's cached export."""
    meta = dict(src.meta)
    base = {k: meta.pop(k) for k in ("producer", "payload_shape", "responses", "dtype")}
    for k in ("format", "created_at"):
        meta.pop(k, None)
    dst = create_store(
        location,
        producer=base["producer"],
        payload_shape=tuple(base["payload_shape"]),
        response_names=base["responses"],
        dtype=base["dtype"],
        extra_meta=meta,
        overwrite=True,
    )
    c = src.columns()
    keep = np.arange(len(c["ts"])) if before_ts is None else np.flatnonzero(np.asarray(c["ts"]) < before_ts)
    payload = np.asarray(c["payload"])[keep]
    if "scale" in c:  # int8: back to the values it encodes (re-encoding gives the same codes and scales)
        payload = payload.astype(np.float32) * np.asarray(c["scale"])[keep].reshape(-1, *[1] * (payload.ndim - 1))
    dst.append(
        np.asarray(c["instance_id"])[keep],
        np.asarray(c["user"])[keep],
        np.asarray(c["ts"])[keep],
        payload,
        np.asarray(c["responses"])[keep],
        np.asarray(c["known_at"])[keep],
    )
    dst.commit()
    return dst


@dataclass
class ScoreQuery:
    """One raw /score request: a user at a time, the request's own fields and each candidate's."""

    user: object
    ts: int
    context: Mapping[str, Any]
    candidates: Sequence[Mapping[str, Any]]


@dataclass
class _RequestRows:
    """A request's raw rows: ``shared`` (user, ts and the fields every candidate shares) once and each
    candidate's own fields, or (``shared`` None) ``candidates`` as full rows."""

    shared: dict[str, Any] | None
    candidates: list[Mapping[str, Any]]


@dataclass
class _History:
    """One user's fetched history, as the batch tensors of one row (batch dim 1)."""

    cat: np.ndarray  # [G, n, F_c] every field of the past rows (SIF's history samples), one row per user
    multi: np.ndarray
    num: np.ndarray
    fetched: Fetched


class Scorer:
    """Scores raw requests and appends raw events for one trained model.

    Args:
        model: the trained model (eval mode is set here).
        hist_len: its item-ID history length (what it was trained with).
        encoder: the dataset's fitted encoder.
        events: the event store (:mod:`sampletok.serving.events`) the history comes from.
        tokens: the token store the model reads (IAT embeddings, SIF codes), or None.
        event_tokenizer: what tokenizes an appended event for ``tokens`` (its token method's; None: events
            append no tokens).
        max_candidates: the most candidates one request may carry.
    """

    def __init__(
        self,
        model: RankingModel,
        hist_len: int,
        encoder: Encoder,
        events: TokenStore,
        tokens: TokenSource | None = None,
        event_tokenizer: EventTokenizer | None = None,
        max_candidates: int = 1000,
    ):
        self.model, self.hist_len, self.encoder = model.eval(), hist_len, encoder
        self.events, self.tokens, self.max_candidates = events, tokens, max_candidates
        if tokens is not None and event_tokenizer is None:
            raise ConfigError("a scorer of a model that reads tokens needs the event tokenizer that appends them")
        self.event_tokenizer = event_tokenizer
        self.schema = encoder.schema
        self._request_fields = [f.name for f in self.schema.features if f.name != self.schema.user]
        self.layout = FeatureLayout.from_dataset(encoder)
        self.codec = EventCodec(self.layout)
        self._seq_cat, self._seq_multi = self.layout.sequence_positions()
        self._delays = np.array(self.schema.response_delays(), np.int64)
        self.on_fetch: Callable[[float], None] | None = None  # seconds each history fetch took (metrics)
        self.example_users: list[str] = []  # raw ids of a few users with history (GET /schema's example)

    # ------------------------------------------------------------------ construction from a run
    @classmethod
    def from_run(
        cls,
        ds: PreparedDataset,
        run_dir: str | Path,
        store: str | Path,
        reset: bool = False,
        before_ts: int | None = None,
        **kw: Any,
    ) -> Scorer:
        """The scorer of a run saved by ``sampletok train``/``compare``, serving from ``store`` (a directory or
        a ``redis://`` URL). Its stores are made there from the run's dataset when missing (or with ``reset``):
        the event store from every prepared row, the token store as a copy of the one the model was trained
        with; otherwise the existing ones are opened (and checked) as they are, appends included.
        ``before_ts``: new stores hold only the rows before it (to replay the rest of a log as events)."""
        from sampletok.train.experiment import load_trained

        trained = load_trained(ds, run_dir)
        method = token_method(trained.model)
        event_tokenizer = None
        if method is not None and trained.tokens is not None:  # checked before any store is made
            event_tokenizer = method.event_tokenizer(trained.tokens, ds)
        codec = EventCodec(FeatureLayout.from_dataset(ds))
        events_at, tokens_at = store_location(store, "events"), store_location(store, "tokens")
        if reset or not store_exists(events_at):
            export_events(ds, events_at, overwrite=True, before_ts=before_ts)
            if trained.tokens is not None:
                copy_tokens(_local_store(trained.tokens.store), tokens_at, before_ts)
        events = open_events(events_at, ds.fingerprint, codec)
        tokens = None
        if trained.tokens is not None:
            served = open_store(tokens_at)
            if served.meta.get("producer") != trained.tokens.producer:
                raise StoreError(
                    f"{tokens_at}: tokens of producer {served.meta.get('producer')}, but the model reads "
                    f"{trained.tokens.producer}; start the service with --reset"
                )
            tokens = TokenSource(served, trained.tokens.hist_len, trained.tokens.dequantize)
        for opened in (events, tokens.store if tokens is not None else None):
            if isinstance(opened, LocalTokenStore):
                opened.gc()  # what a crashed append left (its writer is gone), before serving
        scorer = cls(trained.model, trained.hist_len, Encoder.from_dataset(ds), events, tokens, event_tokenizer, **kw)
        scorer.example_users = list(ds.manifest.get("example_users", []))
        return scorer

    # ------------------------------------------------------------------ scoring
    @staticmethod
    def user_key(user: object) -> int:
        """The stable key of a raw user id (an empty one is a request error)."""
        if user is None or (isinstance(user, str) and not user.strip()):
            raise DataError("request", "missing user", "user")
        if isinstance(user, str):
            try:
                user.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError("request", "not valid Unicode (a lone surrogate)", "user") from None
        return int(user_keys(pl.Series([str(user)]))[0])

    def rows(self, user: object, ts: int, context: Mapping[str, Any], items: Sequence[Mapping[str, Any]]) -> list:
        """The raw rows of a request: its fields with each candidate's (a candidate's value wins). Every row
        must hold every feature, and nothing else (no response, label or key column: a request has none)."""
        s = self.schema
        if not -(2**62) <= int(ts) <= 2**62:
            raise DataError("request", f"timestamp {ts} out of range", "ts")
        features = {f.name: f for f in s.features}
        need = set(features) - {s.user}
        out = []
        for i, item in enumerate(items):
            row = {**context, **item}
            where = "request" if len(items) == 1 else f"request, candidate {i}"
            extra = sorted(set(row) - need)
            if extra:
                keys = set(extra) & {s.user, s.timestamp}
                hint = " (give the user and time as the request's user and ts)" if keys else ""
                raise DataError(where, f"unknown field(s) {extra}; a request holds the features {sorted(need)}{hint}")
            missing = sorted(need - set(row))
            if missing:
                raise DataError(where, f"missing field(s) {missing}")
            for name, value in row.items():
                _check_cell(where, name, value, features[name].type.value == "multi_categorical")
            out.append({s.user: user, s.timestamp: ts, **row})
        return out

    def batch(
        self, user: object, ts: int, context: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]
    ) -> Batch:
        """The batch of one request: N candidate rows sharing one fetched history."""
        key, rr = self._checked(ScoreQuery(user, ts, context, candidates))
        ((_, enc),) = self._encode_each([(0, key, rr)], [None])
        return self._batch(enc, np.array([key]), np.array([int(ts)]), [len(candidates)], self.hist_len, True)

    def score(
        self, user: object, ts: int, context: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]
    ) -> np.ndarray:
        """[N] float64 calibrated probability of the first task label per candidate."""
        return self.score_request(user, ts, context, candidates)[0]

    def score_request(
        self, user: object, ts: int, context: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]
    ) -> tuple[np.ndarray, dict]:
        """(scores, what the history held: ``events`` and ``tokens`` read, ``min_gap_s`` the most recent one's
        age — always > 0, as nothing at or after the request time is read; None without history)."""
        result = self.score_many([ScoreQuery(user, ts, context, candidates)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @torch.no_grad()
    def score_many(self, queries: Sequence[ScoreQuery]) -> list[tuple[np.ndarray, dict] | DataError]:
        """Several requests in one model forward (the service's dynamic batcher): their rows encoded together,
        their users' histories fetched in one store round trip, each request's candidates sharing its own
        history (``Batch.history_group``). Per request: (scores, history info) as :meth:`score_request`, or
        the :class:`~sampletok.errors.DataError` refusing it (a bad request never fails the others)."""
        results: list[tuple[np.ndarray, dict] | DataError | None] = [None] * len(queries)
        valid: list[tuple[int, int, _RequestRows]] = []  # (index, user key, raw rows)
        for i, q in enumerate(queries):
            try:
                valid.append((i, *self._checked(q)))
            except DataError as e:
                results[i] = e
        index, enc = self.encode_together(valid, results)
        if index:
            key_of = {i: key for i, key, _ in valid}
            keys = np.array([key_of[i] for i in index], np.int64)
            times = np.array([int(queries[i].ts) for i in index], np.int64)
            sizes = [len(queries[i].candidates) for i in index]
            batch = self._batch(enc, keys, times, sizes, self.hist_len, self.model.reads_history_samples, True)
            p = self.model.calibrated(self.model(batch).logits[:, 0].double().numpy())
            if not np.isfinite(p).all():  # never a null score: inputs are bounded, so this is a bug, not the caller's
                raise RuntimeError("the model scored a non-finite value")
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
            for i, start, n in zip(index, starts, sizes, strict=True):
                results[i] = (p[start : start + n], _history_info(batch, int(start)))
        return [r if r is not None else DataError("request", "not scored") for r in results]

    def _checked(self, q: ScoreQuery) -> tuple[int, _RequestRows]:
        """(user key, the request's raw rows), or the DataError refusing it."""
        if not q.candidates:
            raise DataError("request", "no candidates", "candidates")
        if len(q.candidates) > self.max_candidates:
            raise DataError("request", f"{len(q.candidates)} candidates, more than the limit {self.max_candidates}")
        key = self.user_key(q.user)
        split = self._split_rows(q)
        return key, split if split is not None else _RequestRows(None, self.rows(q.user, q.ts, q.context, q.candidates))

    def _split_rows(self, q: ScoreQuery) -> _RequestRows | None:
        """A request whose candidates all give the same fields, as one shared row (the user, ts and the context
        fields no candidate overrides) and the candidates' own fields, each cell checked once: encoded apart,
        the shared fields cost one row, not one per candidate. None when the candidates differ in their fields
        or a field is wrong (:meth:`rows` then names the candidate and the field)."""
        s = self.schema
        own = set(q.candidates[0])
        if any(set(c) != own for c in q.candidates[1:]):
            return None
        shared = {k: v for k, v in q.context.items() if k not in own}
        multi = {f.name for f in s.features if f.type.value == "multi_categorical"}
        if set(shared) | own != set(self._request_fields) or set(shared) & own:
            return None
        try:
            for name, value in shared.items():
                _check_cell("request", name, value, name in multi)
            for c in q.candidates:
                for name, value in c.items():
                    _check_cell("request", name, value, name in multi)
        except DataError:
            return None
        if not -(2**62) <= int(q.ts) <= 2**62:
            return None
        return _RequestRows({s.user: q.user, s.timestamp: q.ts, **shared}, list(q.candidates))

    def encode_together(
        self, valid: list[tuple[int, int, _RequestRows]], results: list
    ) -> tuple[list[int], dict[str, np.ndarray]]:
        """(the indices of the requests encoded, their rows' codes concatenated in that order): what one
        forward of :meth:`score_many` reads; a request refused here gets its DataError in ``results``."""
        encoded = self._encode_each(valid, results)
        if not encoded:
            return [], {}
        return [i for i, _ in encoded], {k: np.concatenate([e[k] for _, e in encoded]) for k in encoded[0][1]}

    def _encode_each(
        self, valid: list[tuple[int, int, _RequestRows]], results: list
    ) -> list[tuple[int, dict[str, np.ndarray]]]:
        """The encoded rows of each valid request: one encoder call for every request's shared row and one for
        their candidates' fields (per set of candidate fields), the shared codes repeated over each request's
        candidates; requests given as full rows, or all of them when a call refuses a value, one call each, so
        the error names the request that holds it."""
        if not valid:
            return []
        out: list[tuple[int, dict[str, np.ndarray]]] = []
        by_fields: dict[frozenset, list[tuple[int, _RequestRows]]] = {}
        whole = []
        for i, _, rr in valid:
            if rr.shared is None:
                whole.append((i, rr))
            else:
                by_fields.setdefault(frozenset(rr.candidates[0]), []).append((i, rr))
        try:
            for own, group in by_fields.items():
                shared_fields = set(self._request_fields) - own | {self.schema.user}
                shared = self.encoder.encode([rr.shared for _, rr in group], origin="request", fields=shared_fields)
                sizes = [len(rr.candidates) for _, rr in group]
                cands = self.encoder.encode([c for _, rr in group for c in rr.candidates], origin="request", fields=own)
                _check_magnitudes("request", shared)
                _check_magnitudes("request", cands)
                starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
                for j, (i, _) in enumerate(group):
                    enc = {k: np.repeat(v[j : j + 1], sizes[j], axis=0) for k, v in shared.items()}
                    enc.update({k: v[starts[j] : starts[j + 1]] for k, v in cands.items()})
                    out.append((i, enc))
        except DataError:
            out = []
            whole = [(i, rr) for i, _, rr in valid]
        for i, rr in whole:
            try:
                rows = rr.candidates if rr.shared is None else self._full_rows(rr)
                one = self.encoder.encode(rows, origin="request")
                _check_magnitudes("request", one)
                out.append((i, one))
            except DataError as e:
                if len(valid) == 1:
                    raise
                results[i] = e
        return sorted(out, key=lambda x: x[0])

    def _full_rows(self, rr: _RequestRows) -> list[dict]:
        assert rr.shared is not None
        return [{**rr.shared, **c} for c in rr.candidates]

    def fetch_history(self, keys: np.ndarray, ts: np.ndarray, hist_len: int) -> _History:
        """The last ``hist_len`` events of each user ``keys`` strictly before ``ts`` (one store round trip)."""
        f = self.events.fetch(np.asarray(keys, np.int64), np.asarray(ts, np.int64), hist_len, dequantize=False)
        cat, multi, num = self.codec.unpack(f.payload)
        return _History(cat, multi, num, f)

    def _batch(
        self,
        enc: dict[str, np.ndarray],
        keys: np.ndarray,
        ts: np.ndarray,
        sizes: list[int],
        n: int,
        with_samples: bool,
        with_tokens: bool = False,
    ) -> Batch:
        """The batch of encoded rows ``enc`` of G requests (``sizes[g]`` consecutive rows of user ``keys[g]`` at
        ``ts[g]``): each user's history fetched once from the event store (and its tokens), the rows of a
        request sharing it, assembled by the offline loader's :func:`build_batch`."""
        lay = self.layout
        cat, multi, num = self.codec.unpack(self.codec.pack(enc))
        b, n_labels = len(cat), len(lay.task_labels)
        t0 = time.perf_counter()
        h = self.fetch_history(keys, ts, n)
        tok = self.tokens.fetch(keys, ts) if self.tokens is not None and with_tokens else None
        if self.on_fetch is not None:
            self.on_fetch(time.perf_counter() - t0)
        f, g = h.fetched, len(keys)
        requests = RequestRows(
            cat=cat,
            multi=multi,
            num=num,
            labels=np.zeros((b, n_labels), np.float32),
            user=np.repeat(keys, sizes),
            ts=np.repeat(ts, sizes),
            rows=np.full(b, -1, np.int64),
        )
        history = FetchedHistory(
            cat=h.cat[..., self._seq_cat] if len(self._seq_cat) else np.zeros((g, n, 0), np.int64),
            multi=h.multi[..., self._seq_multi, :] if len(self._seq_multi) else np.zeros((g, n, 0, lay.multi_len)),
            mask=f.mask,
            gap=f.gap,
            rows=np.full_like(f.seq, -1),  # a served history has store tokens, not dataset rows
            responses=f.responses,
            response_mask=f.response_mask,
            group=np.repeat(np.arange(g), sizes),
        )
        if with_samples:  # each past row once, as a sample of its own
            valid = f.mask
            k = int(valid.sum())
            history.sample_index = np.full((g, n), -1, np.int64)
            history.sample_index[valid] = np.arange(k)
            history.samples = RequestRows(
                cat=h.cat[valid],
                multi=h.multi[valid],
                num=h.num[valid],
                labels=np.zeros((k, n_labels), np.float32),
                user=np.repeat(keys, valid.sum(1)),
                ts=np.zeros(k, np.int64),
                rows=np.full(k, -1, np.int64),
            )
            history.samples_history = FetchedHistory.empty(k, lay)
        return build_batch(requests, history, tok)

    def describe(self) -> dict:
        """What a request holds: the user and time, each field (type, group, frequent values) and a valid
        example body (every field at a frequent value) to try the service with."""
        s = self.schema
        fields_: dict[str, dict] = {}
        example: dict[str, Any] = {}
        for f in s.features:
            vocab = self.encoder.stats[f.name].vocab
            info: dict[str, Any] = {"type": f.type.value, "group": f.group}
            if vocab:
                info["examples"] = vocab[:3]
            fields_[f.name] = info
            if f.name != s.user:
                value: Any = vocab[0] if vocab else 1.0
                example[f.name] = [value] if f.type.value == "multi_categorical" else value
        item = {k: v for k, v in example.items() if fields_[k]["group"] == "item"}
        context = {k: v for k, v in example.items() if fields_[k]["group"] != "item"}
        user_vocab = self.encoder.stats[s.user].vocab if s.user in self.encoder.stats else None
        user = (self.example_users or user_vocab or ["a-user"])[0]
        return {
            "user": s.user,
            "timestamp": s.timestamp,
            "ticks_per_second": s.ticks_per_second,
            "fields": fields_,
            "responses": s.response_names,
            "max_candidates": self.max_candidates,
            "example": {"user": user, "context": context, "candidates": [item]},
        }

    def probe_query(self, n_candidates: int) -> ScoreQuery:
        """A valid request of ``n_candidates`` (GET /schema's example: a user with history, now) to time the
        model with (``--max-batch-candidates auto``)."""
        example = self.describe()["example"]
        ts = int(time.time() * self.schema.ticks_per_second)
        n = min(n_candidates, self.max_candidates)
        return ScoreQuery(example["user"], ts, example["context"], example["candidates"] * n)

    @torch.no_grad()
    def warm_up(self) -> None:
        """Run an event's whole path once (encoding with outcomes, its token), storing nothing: the first
        event otherwise pays one-time costs (imports pulled in by the encoder's Arrow path, first-shape
        kernels: ~250 ms measured), and every request queued behind it on the worker thread with it."""
        user = self.describe()["example"]["user"]
        ts = int(time.time() * self.schema.ticks_per_second)
        enc = self.encoder.encode(self._example_event_row(user, ts, {}), outcomes=True, origin="event")
        feats = {k: v for k, v in enc.items() if k.split("__")[0] in ("cat", "multi", "num")}
        self._token_of(feats, self.user_key(user), ts)

    def _example_event_row(self, user: object, ts: int, responses: Mapping[str, Any]) -> dict[str, Any]:
        """A whole raw event row of ``user`` at ``ts`` (the encoder reads whole rows): the example request's
        fields, ``responses`` and placeholders for the others, every known-at at ``ts``."""
        example = self.describe()["example"]
        row = {self.schema.user: user, self.schema.timestamp: ts, **example["context"], **example["candidates"][0]}
        row.update({r: responses.get(r, _placeholder(self.schema, r)) for r in self.schema.response_names})
        row.update({r.known_at: ts for r in self.schema.responses if r.known_at})
        return row

    # ------------------------------------------------------------------ events
    @torch.no_grad()
    def append_event(
        self,
        user: object,
        ts: int,
        fields_: Mapping[str, Any],
        responses: Mapping[str, Any] | None = None,
        known_at: Mapping[str, int] | None = None,
        event_id: str | None = None,
    ) -> tuple[int, bool]:
        """Append one event; returns (its instance id, whether it was stored now). ``responses``: values by name
        (a response not given is never visible); ``known_at``: when a response became known, for responses
        whose schema says so with a ``known_at`` column (the others are known ``delay`` seconds after ``ts``).

        The event row and its token (IAT embedding, SIF codes) are committed together: a reader sees both or
        neither, whatever fails between them. ``event_id`` (the client's id of the event) makes the append
        idempotent: the instance id is derived from it, and a retry of the same event stores nothing and
        returns (the same id, False); another event under a stored ``event_id`` is a
        :class:`~sampletok.errors.ConflictError`."""
        responses, known_at = dict(responses or {}), dict(known_at or {})
        names = self.schema.response_names
        self._check_responses(responses)
        known_cols = {r.name: r.known_at for r in self.schema.responses if r.known_at}
        bad = sorted(set(known_at) - set(known_cols))
        if bad:
            raise DataError("event", f"{bad} have no known_at column in the schema (they use a delay)", "known_at")
        key = self.user_key(user)
        ts = int(ts)
        row = self.rows(user, ts, {}, [dict(fields_)])[0]
        # every response column present for the encoder; those not given are placeholders never made visible
        placeholder = {r: _placeholder(self.schema, r) for r in names if r not in responses}
        row.update({**placeholder, **responses})
        row.update({col: known_at.get(name) for name, col in known_cols.items()})
        enc = self.encoder.encode(row, outcomes=True, origin="event")
        _check_magnitudes("event", enc)
        feats = {k: v for k, v in enc.items() if k.split("__")[0] in ("cat", "multi", "num")}
        row_responses = np.array(
            [[enc[label_col(r) if r in self.schema.task_labels else resp_col(r)][0] for r in names]], np.float32
        )
        row_known_at = ts + self._delays[None, :]
        for i, r in enumerate(names):
            if r in known_cols:
                row_known_at[0, i] = enc[known_col(r)][0]
            if r in placeholder:
                row_known_at[0, i], row_responses[0, i] = NEVER, 0.0
        iid = np.array([secrets.randbits(63) if event_id is None else instance_id_of(event_id)], np.int64)
        token = self._token_of(feats, key, ts)  # its past is what is in the store before it
        users, times = np.array([key]), np.array([ts])
        writes = [(self.events, Instances(iid, users, times, self.codec.pack(feats), row_responses, row_known_at))]
        if token is not None and self.tokens is not None:
            writes.append((self.tokens.store, Instances(iid, users, times, token, row_responses, row_known_at)))
        stored = append_together(writes, unique=event_id is not None)
        return int(iid[0]), stored

    def add_late_responses(
        self,
        event_id: str,
        user: object,
        responses: Mapping[str, Any],
        known_at: Mapping[str, int] | None = None,
        now: int | None = None,
    ) -> int:
        """Responses of a stored event learned after it (``PATCH /events/{event_id}``): each becomes visible
        to requests after its ``known_at`` (default ``now``, in the log's unit), in the event store and the
        token store together. Returns the event's instance id; a NotFoundError when the user has no event
        with this id; a DataError for a response known before the event happened."""
        if not responses:
            raise DataError("event", "no responses to add", "responses")
        names = self.schema.response_names
        self._check_responses(responses)
        bad = sorted(set(known_at or {}) - set(responses))
        if bad:
            raise DataError("event", f"known_at for {bad}, which are not among the responses given", "known_at")
        iid, key = instance_id_of(event_id), self.user_key(user)
        when = int(time.time() * self.schema.ticks_per_second) if now is None else int(now)
        # the responses encoded as an event's are (the encoder reads whole rows: other fields at example values)
        enc = self.encoder.encode(self._example_event_row(user, when, responses), outcomes=True, origin="event")
        _check_magnitudes("event", {k: v for k, v in enc.items() if k.startswith("resp__")})
        values = np.array(
            [enc[label_col(r) if r in self.schema.task_labels else resp_col(r)][0] for r in names], np.float32
        )
        given = np.array([r in responses for r in names])
        known = np.array([int((known_at or {}).get(r, when)) for r in names], np.int64)
        stores: list[TokenStore] = [self.events] + ([self.tokens.store] if self.tokens is not None else [])
        update_responses_together(stores, LateResponses(iid, key, given, values, known))
        return iid

    def _check_responses(self, responses: Mapping[str, Any]) -> None:
        """An event's responses are the schema's, each one value (a DataError naming the field otherwise)."""
        names = self.schema.response_names
        unknown = sorted(set(responses) - set(names))
        if unknown:
            raise DataError("event", f"unknown response(s) {unknown}; the schema has {names}", "responses")
        for name, value in responses.items():
            _check_cell("event", name, value, multi=False)

    def _token_of(self, feats: dict[str, np.ndarray], key: int, ts: int) -> np.ndarray | None:
        """What the model's token store holds for a new event (its IAT embedding, its SIF codes), or None."""
        if self.event_tokenizer is None:
            return None
        n = self.event_tokenizer.hist_len
        batch = self._batch(feats, np.array([key]), np.array([ts]), [1], n, with_samples=False)
        return self.event_tokenizer.encode_event(batch)


def _history_info(batch: Batch, row: int) -> dict:
    """What the history of ``batch``'s row ``row`` held: events and tokens read, the most recent one's age."""
    gaps = [batch.hist_gap[row][batch.hist_mask[row]]]
    info: dict[str, int | float | None] = {"events": int(batch.hist_mask[row].sum())}
    if batch.tokens is not None:
        at = int(batch.history_group[row]) if batch.tokens_by_group and batch.history_group is not None else row
        gaps.append(batch.tokens.gap[at][batch.tokens.mask[at]])
        info["tokens"] = int(batch.tokens.mask[at].sum())
    gap = torch.cat(gaps)
    info["min_gap_s"] = float(gap.min()) if len(gap) else None
    return info


MAX_EVENT_ID = 128  # characters


def instance_id_of(event_id: str) -> int:
    """The instance id of a client's event id: the first 8 bytes of its BLAKE2b digest, as a non-negative
    int64 (ids a log carries are small integers; odds of a clash with one are ~n/2^63).

    Example:
        >>> instance_id_of("e-1") == instance_id_of("e-1") != instance_id_of("e-2")
        True
    """
    if not isinstance(event_id, str) or not event_id.strip() or len(event_id) > MAX_EVENT_ID:
        raise DataError("event", f"an event id is a non-empty string of at most {MAX_EVENT_ID} characters", "event_id")
    try:
        raw = event_id.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError("event", "not valid Unicode (a lone surrogate)", "event_id") from None
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8, person=b"sampletok-event").digest(), "little") >> 1


MAX_NORMALIZED = 1e6  # a served numeric value this many standard deviations out is refused, not scored


def _check_magnitudes(where: str, enc: dict[str, np.ndarray]) -> None:
    """Numeric features and responses of a served row within ``MAX_NORMALIZED`` after normalization: a value
    like 1e30 is valid JSON and a finite float, but overflows the model's layers to a null score."""
    for name, values in enc.items():
        kind, _, field = name.partition("__")
        if kind in ("num", "resp") and values.size and np.abs(values).max() > MAX_NORMALIZED:
            bad = float(np.ravel(values)[np.argmax(np.abs(np.ravel(values)))])
            raise DataError(where, f"value too far out of the training range (normalized {bad:.3g})", field)


def _check_cell(where: str, name: str, value: Any, multi: bool) -> None:
    """A raw cell is a scalar (or, for a multi-categorical field, a list of scalars or one delimited string)."""
    scalar = (str, int, float, bool, type(None))
    ok = isinstance(value, scalar) or (multi and isinstance(value, list) and all(isinstance(v, scalar) for v in value))
    if not ok:
        kind = "a list of values or a string" if multi else "one value (a string or a number)"
        raise DataError(where, f"expected {kind}, got {type(value).__name__}", name)


def _placeholder(schema, name: str) -> Any:
    spec = next((r for r in schema.responses if r.name == name), None)
    return "0" if spec is not None and spec.type == "categorical" else 0


def _local_store(store: TokenStore) -> LocalTokenStore:
    if not isinstance(store, LocalTokenStore):
        raise StoreError("a trained run's token store is a local one")
    return store
