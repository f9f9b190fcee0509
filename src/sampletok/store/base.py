"""The token-store contract every backend implements, the fetch result, and the payload codec they share.

A token store holds, per user, time-ordered instances: an instance id, a timestamp, a payload (an IAT
embedding or SIF codes), the instance's responses and the time each became known (``known_at``).
``fetch(users, before_ts, n)`` has exactly the semantics of :class:`~sampletok.history.HistoryIndex`:
the last ``n`` instances strictly before each request time, most recent last, ties in append order;
responses are zeroed unless known before the request (``known_at < before_ts``).

Backends: :class:`~sampletok.store.local.LocalTokenStore` (a directory of memory-mapped segments, the embedded
default) and :class:`~sampletok.store.redis.RedisTokenStore` (a Redis server, for serving and streaming
appends). :func:`open_store` picks one from a path or a ``redis://`` URL.

Example:
    >>> import numpy as np
    >>> encode_payload(np.array([[0.5, -1.0]]), "int8")["payload"].tolist()
    [[64, -127]]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast, runtime_checkable

import numpy as np

from sampletok.errors import StoreError

PAYLOAD_DTYPES = {
    "float16": np.float16,
    "float32": np.float32,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "int16": np.int16,
    "int32": np.int32,  # packed raw events (codes, and numerics as float32 bits): serving's event store
}


@dataclass
class Fetched:
    """Tokens of B requests × n positions (right-aligned, most recent last)."""

    payload: np.ndarray  # [B, n, *payload_shape] float32 (dequantized) or integer codes
    responses: np.ndarray  # [B, n, R] float32 responses, 0 where not yet known
    response_mask: np.ndarray  # [B, n, R] bool response known before the request
    mask: np.ndarray  # [B, n] bool
    gap: np.ndarray  # [B, n] float32 seconds from the token to the request (meta ticks_per_second)
    seq: np.ndarray  # [B, n] int64 the store's sequence number of each token (local: store row, redis: append
    # order), -1 where padded; not a dataset row


class Instances(NamedTuple):
    """What one append writes: k instances (the arguments of :meth:`TokenStore.append`)."""

    instance_id: np.ndarray  # [k] int64
    user: np.ndarray  # [k] int64 user keys
    ts: np.ndarray  # [k] int64
    payload: np.ndarray  # [k, *payload_shape]
    responses: np.ndarray | None = None  # [k, R] float32
    known_at: np.ndarray | None = None  # [k, R] int64


class LateResponses(NamedTuple):
    """Responses of one stored instance learned after it was stored (``PATCH /events/{id}``): for the responses
    where ``given`` [R] is True, the new value (``values`` [R] float32, encoded) and when it became known
    (``known_at`` [R] int64, never before the instance's own time)."""

    instance_id: int
    user: int
    given: np.ndarray
    values: np.ndarray
    known_at: np.ndarray

    def applied(
        self, ts: int, responses: np.ndarray, known_at: np.ndarray, where: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """The stored row's (responses, known_at) with these late ones in; a DataError for a response said to
        be known before the instance happened (it would reach requests that preceded the outcome)."""
        early = self.given & (self.known_at < ts)
        if early.any():
            from sampletok.errors import DataError

            raise DataError(where, f"a response cannot be known before its event (ts {ts})", "known_at")
        return np.where(self.given, self.values, responses), np.where(self.given, self.known_at, known_at)


@runtime_checkable
class TokenStore(Protocol):
    """What a ranking service, a streaming job and the exports need of a store."""

    @property
    def meta(self) -> dict: ...

    def append(
        self,
        instance_id: np.ndarray,
        user: np.ndarray,
        ts: np.ndarray,
        payload: np.ndarray,
        responses: np.ndarray | None = None,
        known_at: np.ndarray | None = None,
    ) -> None: ...

    def commit(self) -> None: ...

    def update_meta(self, **values: Any) -> None:
        """Add entries to a staged store's meta before its commit (an export's measured speed, say)."""
        ...

    def check_producer(self, expected: str) -> None:
        """A one-line StoreError unless the tokens were written by producer ``expected``."""
        ...

    @classmethod
    def exists(cls, location: str | Path) -> bool:
        """Whether a store was ever committed at ``location``."""
        ...

    def read(self, name: str, seq: np.ndarray | None = None) -> np.ndarray:
        """A stored column (``instance_id``, ``user``, ``ts``, ``payload``, ``responses``, ``known_at``) in sequence
        order: whole, or at the sequence numbers ``seq`` (for exports and appends; a fetch is the serving read)."""
        ...

    def fetch(self, users: np.ndarray, before_ts: np.ndarray, hist_len: int, dequantize: bool = True) -> Fetched: ...

    def close(self) -> None: ...


STORE_FORMAT = 2  # 2: responses and known_at (were side and avail), meta "responses" (was "labels")


def check_dtype(dtype: str) -> None:
    if dtype not in PAYLOAD_DTYPES:
        raise StoreError(f"payload dtype '{dtype}' not one of {sorted(PAYLOAD_DTYPES)}")


def new_meta(
    producer: str, payload_shape: tuple[int, ...], response_names: list[str], dtype: str, extra_meta: dict | None
) -> dict:
    """The meta every backend's ``create`` writes (callers check the dtype before any side effect)."""
    return {
        "format": STORE_FORMAT,
        "producer": producer,
        "payload_shape": list(payload_shape),
        "dtype": dtype,
        "responses": list(response_names),
        "created_at": time.time(),
        **(extra_meta or {}),
    }


def check_producer(where: str, meta: dict, expected: str) -> None:
    """The producer check every backend runs: a model reads only tokens its own producer wrote."""
    got = meta["producer"]
    if got != expected:
        raise StoreError(
            f"{where}: tokens were written by producer {got}, but the model expects {expected}; re-export the "
            "store with the matching model"
        )


def check_format(where: str, meta: dict) -> None:
    if meta.get("format") != STORE_FORMAT:
        raise StoreError(
            f"{where}: store format {meta.get('format')} is not {STORE_FORMAT} (written by another version of "
            "sampletok); export the tokens again"
        )


def encode_payload(payload: np.ndarray, dtype: str, where: str = "store") -> dict[str, np.ndarray]:
    """``payload`` in the store dtype: ``{"payload": ...}`` plus ``"scale"`` [k] for int8 (symmetric per row)."""
    if dtype == "int8":
        flat = payload.reshape(len(payload), -1).astype(np.float32)
        scale = np.abs(flat).max(axis=1) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(flat / scale[:, None]), -127, 127).astype(np.int8)
        return {"payload": q.reshape(payload.shape), "scale": scale.astype(np.float32)}
    if dtype in ("uint8", "uint16", "int16", "int32"):
        info = np.iinfo(cast("type[np.integer]", PAYLOAD_DTYPES[dtype]))
        if payload.size and (payload.min() < info.min or payload.max() > info.max):
            raise StoreError(f"{where}: codes out of range for {dtype}")
    return {"payload": payload.astype(PAYLOAD_DTYPES[dtype])}


def decode_payload(payload: np.ndarray, scale: np.ndarray | None, dtype: str, dequantize: bool) -> np.ndarray:
    """Gathered payload [B, n, ...] back to float32 (float dtypes; int8 times its row scale) or codes as is."""
    if not dequantize or dtype not in ("float16", "float32", "int8"):
        return payload
    out = payload.astype(np.float32)
    if dtype == "int8" and scale is not None:
        out *= scale.reshape(scale.shape + (1,) * (out.ndim - scale.ndim))
    return out


def check_append(
    where: str, meta: dict, instance_id, user, ts, payload, responses, known_at
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The append arguments as arrays of the store's shapes, or a one-line StoreError."""
    k = len(instance_id)
    shape = tuple(meta["payload_shape"])
    a = len(meta["responses"])
    payload = np.asarray(payload)
    if payload.shape != (k, *shape):
        raise StoreError(f"{where}: payload shape {payload.shape} is not ({k}, {', '.join(map(str, shape))})")
    ts = np.asarray(ts, np.int64)
    if np.asarray(user).shape != (k,) or ts.shape != (k,):
        raise StoreError(f"{where}: instance_id, user and ts must all have length {k}")
    responses = np.zeros((k, a), np.float32) if responses is None else np.asarray(responses, np.float32).reshape(k, a)
    known_at = (
        np.broadcast_to(ts[:, None], (k, a)) if known_at is None else np.asarray(known_at, np.int64).reshape(k, a)
    )
    return (
        np.asarray(instance_id, np.int64),
        np.asarray(user, np.int64),
        ts,
        payload,
        responses,
        np.ascontiguousarray(known_at),
    )
