"""A token store on a Redis server (``pip install sampletok[redis]``): the serving-side backend, where a
streaming job appends each event's token as it happens and the ranking service fetches users' recent tokens.

URL: ``redis://host:port/db?store=NAME`` (``store`` names the store; default ``sampletok``).

Layout (one sorted set per user, so a fetch is one ``ZREVRANGEBYSCORE`` per user, all pipelined in one round
trip)::

    NAME:current              id of the committed version (switched last: the commit point)
    NAME:<vid>:meta           the store's meta (JSON)
    NAME:<vid>:seq            append counter (orders instances of equal timestamp, as the local store does)
    NAME:<vid>:u:<user>       sorted set, score = timestamp, member = packed instance

A member packs, at fixed width: timestamp and sequence number (big-endian, so members of equal score sort in
append order), instance id, each response's known-at time and value, the int8 scale and the payload. So the
fetch has the local store's semantics exactly: the last ``n`` instances strictly before the request time
(an exclusive score bound), most recent last, responses zeroed unless known before the request.

Atomicity: :meth:`RedisTokenStore.create` writes a new version beside the committed one, invisible until
:meth:`commit` switches ``NAME:current`` (the old version's keys are then deleted). Every fetch reads
``NAME:current`` in its round trip and every append checks it: a reader of a replaced version, or of a store
lost in a Redis restart without persistence, gets a StoreError (the service answers 503 and /healthz is
unhealthy) instead of empty histories and appends into a version no one will open. An append to a committed
store is one ``MULTI``/``EXEC`` transaction (sequence numbers drawn with ``INCRBY`` inside it), so concurrent
writers interleave whole appends and lose none.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import numpy as np

from sampletok.errors import StoreError
from sampletok.store.base import (
    PAYLOAD_DTYPES,
    Fetched,
    LateResponses,
    check_append,
    check_dtype,
    check_format,
    check_producer,
    decode_payload,
    encode_payload,
    new_meta,
)


def _client(url: str):
    """(redis client, store name) for a URL; a missing package or an unreachable server is one line."""
    try:
        import redis
    except ImportError:
        raise StoreError(f"{url}: the Redis backend needs the redis package (pip install 'sampletok[redis]')") from None
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    name = query.pop("store", ["sampletok"])[0]
    rest = "&".join(f"{k}={v[0]}" for k, v in query.items())
    client = redis.Redis.from_url(urlunsplit(parts._replace(query=rest)), socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as e:
        raise StoreError(f"{url}: cannot reach the Redis server ({type(e).__name__}: {e})") from None
    return client, name


class RedisTokenStore:
    """A token store on Redis; see the module docstring. Create with :meth:`create` (staged until
    :meth:`commit`), open the committed version with :meth:`open`."""

    def __init__(self, url: str, client, name: str, vid: str, meta: dict, staged: bool):
        self.url, self.client, self.name, self.vid = url, client, name, vid
        self._meta, self.staged = meta, staged
        self._layout()

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(
        cls,
        url: str,
        producer: str,
        payload_shape: tuple[int, ...],
        response_names: list[str],
        dtype: str = "float16",
        extra_meta: dict | None = None,
        overwrite: bool = False,
    ) -> RedisTokenStore:
        check_dtype(dtype)
        client, name = _client(url)
        if client.exists(f"{name}:current") and not overwrite:
            raise StoreError(f"{url}: a token store '{name}' already exists (pass overwrite=True to replace it)")
        meta = new_meta(producer, payload_shape, response_names, dtype, extra_meta)
        vid = uuid.uuid4().hex[:12]
        client.set(f"{name}:{vid}:meta", json.dumps(meta))
        return cls(url, client, name, vid, meta, staged=True)

    @classmethod
    def exists(cls, location: str | Path) -> bool:
        """Whether a committed store is at the URL ``location`` (an unreachable server is an error, not False)."""
        client, name = _client(str(location))
        try:
            return bool(client.exists(f"{name}:current"))
        finally:
            client.close()

    @classmethod
    def open(cls, url: str, expect_producer: str | None = None) -> RedisTokenStore:
        client, name = _client(url)
        vid = client.get(f"{name}:current")
        if vid is None:
            raise StoreError(f"{url}: no token store '{name}' (none committed there)")
        raw = client.get(f"{name}:{vid.decode()}:meta")
        if raw is None:
            raise StoreError(f"{url}: store '{name}' names version {vid.decode()}, which has no meta")
        meta = json.loads(raw)
        check_format(url, meta)
        store = cls(url, client, name, vid.decode(), meta, staged=False)
        if expect_producer is not None:
            store.check_producer(expect_producer)
        return store

    def check_producer(self, expected: str) -> None:
        check_producer(self.url, self._meta, expected)

    def update_meta(self, **values: Any) -> None:
        """Add entries to a staged store's meta before its commit."""
        if not self.staged:
            raise StoreError(f"{self.url}: update_meta is for staged stores (RedisTokenStore.create)")
        self._meta = {**self._meta, **values}
        self.client.set(f"{self.name}:{self.vid}:meta", json.dumps(self._meta))

    @property
    def meta(self) -> dict:
        return self._meta

    def commit(self) -> None:
        """Publish a staged store; the version it replaces is deleted (readers re-open to see the new one)."""
        if not self.staged:
            return
        old = self.client.getset(f"{self.name}:current", self.vid)  # the commit point
        self.staged = False
        if old is not None and old.decode() != self.vid:
            self._delete_version(old.decode())

    def _delete_version(self, vid: str) -> None:
        batch = []
        for key in self.client.scan_iter(match=f"{self.name}:{vid}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                self.client.unlink(*batch)
                batch = []
        if batch:
            self.client.unlink(*batch)

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ packing
    def _layout(self) -> None:
        """The fixed-width member layout: a structured dtype, so packing and unpacking are one numpy view."""
        shape = tuple(self._meta["payload_shape"])
        a = len(self._meta["responses"])
        dt = self._meta["dtype"]
        fields = [("ts", ">i8"), ("seq", ">i8"), ("iid", "<i8"), ("known_at", "<i8", (a,)), ("responses", "<f4", (a,))]
        if dt == "int8":
            fields.append(("scale", "<f4"))
        fields.append(("payload", np.dtype(PAYLOAD_DTYPES[dt]).newbyteorder("<"), shape))
        self._record = np.dtype(fields)

    def _check_current(self, current: bytes | None) -> None:
        """A StoreError unless this (committed) version is still the store's current one: after a Redis restart
        without persistence the keys are gone, and scoring from an empty history, or appending to an orphaned
        version, would lose data silently."""
        if self.staged:
            return
        if current is None:
            raise StoreError(
                f"{self.url}: the store is gone from the server (a restart without persistence, or a flush); "
                "restore it or restart the service with --reset"
            )
        if current.decode() != self.vid:
            raise StoreError(f"{self.url}: the store was replaced since it was opened; open it again")

    def _key(self, user: int) -> str:
        return f"{self.name}:{self.vid}:u:{user}"

    # ------------------------------------------------------------------ writes
    def append(
        self,
        instance_id: np.ndarray,
        user: np.ndarray,
        ts: np.ndarray,
        payload: np.ndarray,
        responses: np.ndarray | None = None,
        known_at: np.ndarray | None = None,
    ) -> None:
        """Add instances, atomically (one transaction); on a staged store they are visible after commit."""
        rec, user = self._records(instance_id, user, ts, payload, responses, known_at)
        k = len(rec)
        if k == 0:
            return
        import redis

        try:
            self._check_current(self.client.get(f"{self.name}:current"))
            # the sequence numbers first (one INCRBY), then every ZADD in one MULTI/EXEC: a crash mid-way
            # leaves a gap in the sequence, never a partial append
            self._draw_seq(rec)
            pipe = self.client.pipeline(transaction=True)
            for key, members in self._members(rec, user):  # one ZADD per user, not per instance
                pipe.zadd(key, members)
            pipe.execute()
        except redis.RedisError as e:
            raise StoreError(f"{self.url}: append failed ({type(e).__name__}: {e})") from None

    def _records(self, instance_id, user, ts, payload, responses, known_at) -> tuple[np.ndarray, np.ndarray]:
        """(checked instances as packed members without their sequence numbers, their users)."""
        iid, user, ts, payload, responses, known_at = check_append(
            self.url, self._meta, instance_id, user, ts, payload, responses, known_at
        )
        enc = encode_payload(payload, self._meta["dtype"], self.url)
        rec = np.zeros(len(iid), self._record)
        rec["ts"], rec["iid"], rec["known_at"], rec["responses"], rec["payload"] = (
            ts,
            iid,
            known_at,
            responses,
            enc["payload"],
        )
        if "scale" in enc:
            rec["scale"] = enc["scale"]
        return rec, user

    def _draw_seq(self, rec: np.ndarray) -> None:
        """Sequence numbers for ``rec`` (one INCRBY; one that is never written leaves a gap, not a reorder)."""
        k = len(rec)
        first = int(self.client.incrby(f"{self.name}:{self.vid}:seq", k)) - k
        rec["seq"] = np.arange(first, first + k, dtype=np.int64)

    def _members(self, rec: np.ndarray, user: np.ndarray) -> list[tuple[str, dict[bytes, int]]]:
        """(sorted-set key, {member: timestamp}) per user of ``rec``."""
        raw, size = rec.tobytes(), self._record.itemsize
        order = np.argsort(user, kind="stable")
        bounds = np.flatnonzero(np.r_[True, user[order][1:] != user[order][:-1], True])
        ts = rec["ts"].astype(np.int64)
        return [
            (self._key(int(user[order[s]])), {raw[i * size : (i + 1) * size]: int(ts[i]) for i in order[s:e]})
            for s, e in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    def _same_server(self, other: RedisTokenStore) -> bool:
        keys = ("host", "port", "db", "path")
        mine, theirs = self.client.connection_pool.connection_kwargs, other.client.connection_pool.connection_kwargs
        return all(mine.get(k) == theirs.get(k) for k in keys)

    # ------------------------------------------------------------------ reads
    def read(self, name: str, seq: np.ndarray | None = None) -> np.ndarray:
        """A stored column in sequence order (whole, or at the sequence numbers ``seq``): one scan of every
        user's set, for exports and copies, not for serving (sequence numbers a crashed append skipped are
        absent, so ``seq`` indexes the instances present, in order)."""
        import redis

        members: list[bytes] = []
        users: list[int] = []
        try:
            for key in self.client.scan_iter(match=f"{self.name}:{self.vid}:u:*", count=1000):
                got = self.client.zrange(key, 0, -1)
                members.extend(got)
                users.extend([int(key.rsplit(b":", 1)[1])] * len(got))
        except redis.RedisError as e:
            raise StoreError(f"{self.url}: read failed ({type(e).__name__}: {e})") from None
        rec = np.frombuffer(b"".join(members), self._record)
        order = np.argsort(rec["seq"], kind="stable")
        rec = rec[order]
        field = {"instance_id": "iid"}.get(name, name)
        if field != "user" and field not in (self._record.names or ()):
            raise StoreError(f"{self.url}: no stored column '{name}'")
        column = np.asarray(users, np.int64)[order] if field == "user" else rec[field]
        if field == "payload":
            scale = rec["scale"] if "scale" in (self._record.names or ()) else None
            column = decode_payload(column, scale, self._meta["dtype"], dequantize=False)
        column = column.astype(column.dtype.newbyteorder("="))
        return column if seq is None else column[np.asarray(seq, np.int64)]

    def fetch(self, users: np.ndarray, before_ts: np.ndarray, hist_len: int, dequantize: bool = True) -> Fetched:
        """The last ``hist_len`` tokens of each user strictly before each request time: one pipelined round trip."""
        import redis

        users = np.asarray(users, np.int64)
        before_ts = np.asarray(before_ts, np.int64)
        b = len(users)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(f"{self.name}:current")  # in the same round trip: is the version read still the store?
            for u, t in zip(users.tolist(), before_ts.tolist(), strict=True):
                pipe.zrevrangebyscore(self._key(u), f"({t}", "-inf", start=0, num=hist_len)
            current, *replies = pipe.execute()
        except redis.RedisError as e:
            raise StoreError(f"{self.url}: fetch failed ({type(e).__name__}: {e})") from None
        self._check_current(current)
        if hist_len <= 0:
            replies = [[] for _ in range(b)]
        counts = np.array([len(r) for r in replies], np.int64)
        rec = np.frombuffer(b"".join(m for r in replies for m in r), self._record)
        # reply i holds its user's most recent first: item j goes to position hist_len-1-j (right-aligned)
        req = np.repeat(np.arange(b), counts)
        pos = hist_len - 1 - (np.arange(len(rec)) - np.repeat(np.cumsum(counts) - counts, counts))
        shape = tuple(self._meta["payload_shape"])
        a = len(self._meta["responses"])
        mask = np.zeros((b, hist_len), bool)
        mask[req, pos] = True
        payload = np.zeros((b, hist_len, *shape), PAYLOAD_DTYPES[self._meta["dtype"]])
        payload[req, pos] = rec["payload"]
        scale = None
        if "scale" in (self._record.names or ()):
            scale = np.zeros((b, hist_len), np.float32)
            scale[req, pos] = rec["scale"]
        payload = decode_payload(payload, scale, self._meta["dtype"], dequantize)
        response_mask = np.zeros((b, hist_len, a), bool)
        response_mask[req, pos] = rec["known_at"] < before_ts[req, None]
        responses = np.zeros((b, hist_len, a), np.float32)
        responses[req, pos] = np.where(response_mask[req, pos], rec["responses"], 0.0)
        gap = np.zeros((b, hist_len), np.float32)
        tps = np.float32(self._meta.get("ticks_per_second", 1))  # seconds, as the local store computes them
        gap[req, pos] = (before_ts[req] - rec["ts"].astype(np.int64)).astype(np.float32) / tps
        seq = np.full((b, hist_len), -1, np.int64)
        seq[req, pos] = rec["seq"]
        return Fetched(payload=payload, responses=responses, response_mask=response_mask, mask=mask, gap=gap, seq=seq)


# One atomic server-side step for an append to several stores (the event and its token): the version checks,
# the retry check and every ZADD run with no other command in between, and nothing is written unless every
# check passed. KEYS: the m stores' current keys, the first store's ids hash, the sorted sets. ARGV: m, the m
# version ids, u, u (instance id, record) pairs, then per sorted set its member count and (score, member)s.
_APPEND_TOGETHER = """
local m = tonumber(ARGV[1])
for i = 1, m do
  if redis.call('GET', KEYS[i]) ~= ARGV[1 + i] then return {-2, i} end
end
local p = m + 2
local u = tonumber(ARGV[p]); p = p + 1
local ids = KEYS[m + 1]
if u > 0 then
  local hits, same = 0, 0
  for j = 0, u - 1 do
    local old = redis.call('HGET', ids, ARGV[p + 2 * j])
    if old then
      hits = hits + 1
      if old == ARGV[p + 2 * j + 1] then same = same + 1 end
    end
  end
  if hits > 0 then
    if hits == u and same == u then return {0} end
    return {-1}
  end
end
local first = p
p = p + 2 * u
for k = m + 2, #KEYS do
  local n = tonumber(ARGV[p]); p = p + 1
  local j = 0
  while j < n do
    local args = {}
    local c = math.min(n - j, 1000)
    for q = 1, c do
      args[2 * q - 1] = ARGV[p]; args[2 * q] = ARGV[p + 1]; p = p + 2
    end
    redis.call('ZADD', KEYS[k], unpack(args))
    j = j + c
  end
end
for j = 0, u - 1 do redis.call('HSET', ids, ARGV[first + 2 * j], ARGV[first + 2 * j + 1]) end
return {1}
"""


def commit_appends(writes: list[tuple[RedisTokenStore, tuple]], unique: bool = False) -> bool:
    """Append to committed stores on one Redis server in **one atomic step** (a Lua script): every store gets
    its write or none does, and no reader sees one without the other. Returns False (nothing written) when
    ``unique`` and the first write's instance ids are stored already with the same content (a retried event:
    the first store keeps an id → content hash for them); other content under a stored id is a ConflictError."""
    import redis

    from sampletok.errors import ConflictError

    stores = [w[0] for w in writes]
    first = stores[0]
    for st in stores:
        if st.staged:
            raise StoreError(f"{st.url}: commit the store before appending to it together with others")
        if not first._same_server(st):
            raise StoreError(f"{st.url}: stores appended together must be on one Redis server ({first.url})")
    built = [(st, *st._records(*arrays)) for st, arrays in zip(stores, [w[1] for w in writes], strict=True)]
    keys = [f"{st.name}:current" for st in stores] + [f"{first.name}:{first.vid}:ids"]
    args: list[bytes | str | int] = [len(stores), *[st.vid for st in stores]]
    rec0, user0 = built[0][1], built[0][2]
    if unique:  # what a retry must match: the user and the packed instance, without its sequence number and
        plain = rec0.copy()  # responses (late responses may change those; the event stays the same)
        plain["seq"], plain["responses"], plain["known_at"] = 0, 0, 0
        args.append(len(plain))
        for i in range(len(plain)):
            args += [
                int(plain["iid"][i]).to_bytes(8, "little", signed=True),
                int(user0[i]).to_bytes(8, "little", signed=True) + plain[i : i + 1].tobytes(),
            ]
    else:
        args.append(0)
    try:
        for st, rec, user in built:
            if len(rec):
                st._draw_seq(rec)
                for key, members in st._members(rec, user):
                    keys.append(key)
                    args.append(len(members))
                    for member, score in members.items():
                        args += [score, member]
        reply = first.client.eval(_APPEND_TOGETHER, len(keys), *keys, *args)
    except redis.RedisError as e:
        raise StoreError(f"{first.url}: append failed ({type(e).__name__}: {e})") from None
    code = int(reply[0])
    if code == -2:
        stores[int(reply[1]) - 1]._check_current(first.client.get(keys[int(reply[1]) - 1]))
        raise StoreError(f"{stores[int(reply[1]) - 1].url}: the store changed during the append; open it again")
    if code == -1:
        raise ConflictError(
            f"{first.url}: instance id {int(rec0['iid'][0])} is stored already with other content; an event id "
            "names one event"
        )
    return code == 1


def commit_late_responses(stores: list[RedisTokenStore], late: LateResponses) -> int:
    """Set the late responses of one stored instance in every store holding it (the event store first: it must
    hold it, else a NotFoundError) in one optimistic transaction (WATCH the users' sets and the stores' current
    ids, then MULTI/EXEC: one member replaced per store, or nothing when another writer got in first, and then
    again). Returns the instance's timestamp."""
    import redis

    from sampletok.errors import NotFoundError

    first = stores[0]
    for st in stores:
        if not first._same_server(st):
            raise StoreError(f"{st.url}: stores updated together must be on one Redis server ({first.url})")
    keys = [st._key(late.user) for st in stores]
    currents = [f"{st.name}:current" for st in stores]
    try:
        with first.client.pipeline() as pipe:
            for _ in range(100):  # retried only when a concurrent write touched these keys
                try:
                    pipe.watch(*keys, *currents)
                    for st, cur in zip(stores, currents, strict=True):
                        st._check_current(pipe.get(cur))
                    swaps, ts = [], None
                    for k, (st, key) in enumerate(zip(stores, keys, strict=True)):
                        members = pipe.zrange(key, 0, -1)
                        rec = np.frombuffer(b"".join(members), st._record) if members else np.zeros(0, st._record)
                        hit = np.flatnonzero(rec["iid"] == late.instance_id)
                        if not len(hit):
                            if k == 0:
                                raise NotFoundError(f"no stored event with this id for user {late.user}")
                            continue
                        new = rec[hit[-1] : hit[-1] + 1].copy()
                        ts = int(new["ts"][0]) if ts is None else ts
                        new["responses"][0], new["known_at"][0] = late.applied(
                            int(new["ts"][0]), new["responses"][0], new["known_at"][0], "event"
                        )
                        swaps.append((key, members[hit[-1]], new.tobytes(), int(new["ts"][0])))
                    pipe.multi()
                    for key, old, member, score in swaps:
                        pipe.zrem(key, old)
                        pipe.zadd(key, {member: score})
                    pipe.execute()
                    assert ts is not None
                    return ts
                except redis.WatchError:
                    continue
    except redis.RedisError as e:
        raise StoreError(f"{first.url}: update failed ({type(e).__name__}: {e})") from None
    raise StoreError(f"{first.url}: the update kept losing to concurrent writers; try again")


@contextmanager
def local_redis_server(folder: str | Path) -> Iterator[str]:
    """Start Debian's ``redis-server`` on a free loopback port with its files in ``folder`` (no persistence),
    yield its URL, stop it at exit: for tests, benchmarks and trying the service on one machine."""
    import shutil
    import socket
    import subprocess

    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise StoreError("redis-server is not installed (Debian: apt-get install -y redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise StoreError(f"redis-server did not start on port {port}")
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
