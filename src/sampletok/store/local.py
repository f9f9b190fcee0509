"""The embedded instance-token store: a directory of immutable, memory-mapped segments.

Layout::

    store/
      CURRENT                 name of the committed manifest (replaced atomically with os.replace)
      LOCK                    writers hold an exclusive flock on it while they commit
      manifest-000003.json    meta (producer, payload dtype/shape, labels) + the list of live segments
      segments/seg-<id>/      instance_id.npy user.npy ts.npy payload.npy [scale.npy] responses.npy known_at.npy

Every write builds new segments under temporary names and publishes them with a new manifest; ``CURRENT`` is
switched last (the commit point). So:

* a store is readable only once complete: :meth:`create` stages its segments and nothing is visible until
  :meth:`commit` (an interrupted export leaves no store, or the previous one, never a partial one);
* ``create(overwrite=True)`` keeps the old store readable until the new one is committed;
* appends to a committed store take an exclusive lock and re-read ``CURRENT`` before committing, so two
  processes appending at once both land (versions N+1 and N+2), neither is lost;
* a reader memory-maps its version's segments when it opens, so a later commit or a compaction that removes
  those segments' files does not disturb it (POSIX keeps unlinked mapped files alive).

``fetch(users, before_ts, n)`` has the semantics of :class:`~sampletok.store.base.TokenStore` (those of
:class:`~sampletok.history.HistoryIndex`).

Example:
    >>> import numpy as np, tempfile
    >>> store = LocalTokenStore.create(tempfile.mkdtemp() + "/s", producer="demo", payload_shape=(2,),
    ...                                response_names=["click"], dtype="float32")
    >>> store.append(instance_id=np.array([1, 2]), user=np.array([7, 7]), ts=np.array([10, 20]),
    ...              payload=np.array([[1., 2.], [3., 4.]]), responses=np.array([[1.], [0.]]),
    ...              known_at=np.array([[10], [20]]))
    >>> store.commit()
    >>> LocalTokenStore.open(store.root).fetch(np.array([7]), np.array([20]), hist_len=2).payload.tolist()
    [[[0.0, 0.0], [1.0, 2.0]]]
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from sampletok.atomic import locked, save_atomic
from sampletok.errors import ConflictError, DataError, NotFoundError, StoreError
from sampletok.history import HistoryIndex
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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _save(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, arr)
        fh.flush()
        os.fsync(fh.fileno())


class LocalTokenStore:
    """Directory token store. :meth:`create` stages a new one (published by :meth:`commit`); :meth:`open` reads
    the committed version.

    ``on_before_commit`` is called after a write's segments are on disk and before ``CURRENT`` switches (tests
    inject a crash there)."""

    def __init__(
        self,
        root: Path,
        manifest: dict,
        manifest_name: str,
        staged: bool = False,
        on_before_commit: Callable[[], None] | None = None,
    ):
        self.root, self.manifest, self.manifest_name = root, manifest, manifest_name
        self.staged = staged
        self.overwrite = False  # create(overwrite=True): commit may replace a store committed meanwhile
        self.on_before_commit = on_before_commit
        self._span_state: tuple[int, int, int] | None = None  # (min ts, max ts, users)
        self._cache: dict[str, np.ndarray] | None = None  # whole columns (columns(), load_into_memory)
        self._parts: dict[str, list[np.ndarray]] | None = None  # each column's segment memory maps
        self._index: HistoryIndex | None = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(
        cls,
        root: str | Path,
        producer: str,
        payload_shape: tuple[int, ...],
        response_names: list[str],
        dtype: str = "float16",
        extra_meta: dict | None = None,
        overwrite: bool = False,
        on_before_commit: Callable[[], None] | None = None,
    ) -> LocalTokenStore:
        """A new store, staged: appends write segments that become visible only at :meth:`commit`."""
        root = Path(root)
        check_dtype(dtype)
        if (root / "CURRENT").exists() and not overwrite:
            raise StoreError(f"{root}: a token store already exists (pass overwrite=True to replace it)")
        (root / "segments").mkdir(parents=True, exist_ok=True)
        meta = new_meta(producer, payload_shape, response_names, dtype, extra_meta)
        store = cls(
            root, {"meta": meta, "segments": [], "version": 0}, "", staged=True, on_before_commit=on_before_commit
        )
        store.overwrite = overwrite
        return store

    @classmethod
    def open(
        cls, root: str | Path, expect_producer: str | None = None, on_before_commit: Callable[[], None] | None = None
    ) -> LocalTokenStore:
        """The committed version of a store, its segments memory-mapped now (see the module docstring)."""
        root = Path(root)
        if not (root / "CURRENT").exists():
            _read_current(root)  # the one-line "not a token store" error, without creating a LOCK file
        if (root / PENDING).exists():
            recover(root)  # a multi-store commit cut off by a crash: finished or undone, before any read
        # shared lock: no commit, compaction or gc runs between reading CURRENT and mapping its segments
        with locked(root / "LOCK", shared=True):
            name, manifest = _read_current(root)
            store = cls(root, manifest, name, on_before_commit=on_before_commit)
            store._segments()
        if expect_producer is not None:
            store.check_producer(expect_producer)
        return store

    @classmethod
    def exists(cls, location: str | Path) -> bool:
        return (Path(location) / "CURRENT").exists()

    def check_producer(self, expected: str) -> None:
        check_producer(str(self.root), self.meta, expected)

    @property
    def meta(self) -> dict:
        return self.manifest["meta"]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def payload_dtype(self) -> np.dtype:
        return np.dtype(PAYLOAD_DTYPES[self.meta["dtype"]])

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive writer lock (flock on ``LOCK``): one commit at a time, across processes."""
        with locked(self.root / "LOCK"):
            yield

    def _publish(self, manifest: dict, replaces: str = "") -> None:
        """Write ``manifest`` and switch ``CURRENT`` to it (caller holds the lock); then drop the manifest file
        it ``replaces`` (readers read their manifest once, at open)."""
        if self.on_before_commit is not None:
            self.on_before_commit()
        name = self._write_manifest(manifest)
        self._switch(name, manifest, replaces)

    def _write_manifest(self, manifest: dict) -> str:
        """Write a manifest file (not yet current) and return its name."""
        name = f"manifest-{manifest['version']:06d}.json"
        save_atomic(self.root / name, lambda fh: json.dump(manifest, fh), binary=False)
        return name

    def _switch(self, name: str, manifest: dict, replaces: str = "") -> None:
        """Make the written manifest ``name`` current (the commit point of a one-store write)."""
        _write_current(self.root, name)
        self.manifest, self.manifest_name, self.staged = manifest, name, False
        self._cache, self._parts, self._index = None, None, None
        self._segments()  # map the new version now, under the lock, before anything can remove its files
        if replaces and replaces != name:
            (self.root / replaces).unlink(missing_ok=True)

    def commit(self) -> None:
        """Publish a staged store (its segments become the store's content, replacing any older version)."""
        if not self.staged:
            return
        with self._locked():
            old_segments: list[str] = []
            old_manifest = ""
            version = 1
            if (self.root / "CURRENT").exists() and not self.overwrite:
                raise StoreError(
                    f"{self.root}: another writer created a token store here first (create it with "
                    "overwrite=True to replace it)"
                )
            if (self.root / "CURRENT").exists():
                old_manifest, old = _read_current(self.root)
                old_segments, version = old["segments"], old["version"] + 1
            self._publish({**self.manifest, "version": version}, replaces=old_manifest)
            # old readers keep their memory maps; new readers only see the new manifest
            for seg in old_segments:
                shutil.rmtree(self.root / "segments" / seg, ignore_errors=True)

    # ------------------------------------------------------------------ writes
    def append(
        self,
        instance_id: np.ndarray,
        user: np.ndarray,
        ts: np.ndarray,
        payload: np.ndarray,
        responses: np.ndarray | None = None,
        known_at: np.ndarray | None = None,
        meta_update: dict | None = None,
    ) -> None:
        """Add instances. ``payload`` [k, *payload_shape] (float, quantized to the store dtype, or codes);
        ``responses`` [k, A] label values; ``known_at`` [k, A] the time each label becomes known. On a committed store
        the append is committed at once (a new version, whose metadata gets ``meta_update``, e.g. the dataset
        the store now covers); on a staged one it waits for :meth:`commit`."""
        arrays = self._checked(instance_id, user, ts, payload, responses, known_at)
        self._refuse_unindexable(arrays["user"], arrays["ts"])
        if self.staged:
            self.add_segments([self._write_segment(arrays)])
            if meta_update:
                self.update_meta(**meta_update)
            return
        commit_appends([(self, arrays, meta_update)])

    def _refuse_unindexable(self, user: np.ndarray, ts: np.ndarray) -> None:
        """A DataError, before anything is written, for timestamps so far from the stored ones that the history
        index could no longer be built (users × time span must stay below 2^62): one bad event must never make
        the store unreadable for every user."""
        if not len(ts):
            return
        if self._span_state is None:  # once per opened store; appends then update it
            stored_ts, stored_user = np.asarray(self._key_column("ts")), np.asarray(self._key_column("user"))
            lo, hi = (int(stored_ts.min()), int(stored_ts.max())) if len(stored_ts) else (int(ts[0]), int(ts[0]))
            self._span_state = (lo, hi, len(np.unique(stored_user)))
        lo, hi, users = self._span_state
        new_lo, new_hi = min(lo, int(ts.min())), max(hi, int(ts.max()))
        new_users = users + len(np.unique(user))  # an upper bound: some may be stored already
        if (new_users + 1) * (new_hi - new_lo + 2) >= 2**62:
            far = int(ts[np.argmax(np.maximum(lo - ts, ts - hi))])
            raise DataError(
                str(self.root),
                f"timestamp {far} is too far from the stored ones ({lo} .. {hi}) for the history index; refused",
                "ts",
            )
        self._span_state = (new_lo, new_hi, new_users)

    def _checked(
        self,
        instance_id: np.ndarray,
        user: np.ndarray,
        ts: np.ndarray,
        payload: np.ndarray,
        responses: np.ndarray | None,
        known_at: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        instance_id, user, ts, payload, responses, known_at = check_append(
            str(self.root), self.meta, instance_id, user, ts, payload, responses, known_at
        )
        arrays: dict[str, np.ndarray] = {"instance_id": instance_id, "user": user, "ts": ts, "responses": responses}
        arrays["known_at"] = known_at
        arrays.update(encode_payload(payload, self.meta["dtype"], str(self.root)))
        return arrays

    def write_segment(
        self,
        instance_id: np.ndarray,
        user: np.ndarray,
        ts: np.ndarray,
        payload: np.ndarray,
        responses: np.ndarray | None = None,
        known_at: np.ndarray | None = None,
    ) -> str:
        """Write instances as one segment of this staged store and return its name, without adding it: for
        writers in other processes (a distributed export's tasks), whose segments the driver adds in order with
        :meth:`add_segments` before one :meth:`commit`. A segment never added is removed by :meth:`gc`."""
        if not self.staged:
            raise StoreError(f"{self.root}: write_segment is for staged stores (LocalTokenStore.create)")
        return self._write_segment(self._checked(instance_id, user, ts, payload, responses, known_at))

    def add_segments(self, names: list[str]) -> None:
        """Add written segments (in this order) to a staged store; they become visible at :meth:`commit`."""
        if not self.staged:
            raise StoreError(f"{self.root}: add_segments is for staged stores (LocalTokenStore.create)")
        missing = [n for n in names if not (self.root / "segments" / n).is_dir()]
        if missing:
            raise StoreError(f"{self.root}: segments {missing} were never written")
        self.manifest = {**self.manifest, "segments": self.manifest["segments"] + list(names)}
        self._cache, self._parts, self._index = None, None, None

    def update_meta(self, **values: Any) -> None:
        """Add entries to a staged store's metadata before its commit (e.g. an export's measured speed)."""
        if not self.staged:
            raise StoreError(f"{self.root}: update_meta is for staged stores (LocalTokenStore.create)")
        self.manifest = {**self.manifest, "meta": {**self.meta, **values}}

    def _write_segment(self, arrays: dict[str, np.ndarray]) -> str:
        """Write a segment folder (fsynced, renamed into place) and return its name; not yet committed."""
        seg_dir = self.root / "segments"
        seg_dir.mkdir(parents=True, exist_ok=True)
        name = f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"  # unique across concurrent writers
        tmp = seg_dir / f".{name}.tmp-{os.getpid()}"
        tmp.mkdir()
        for key, arr in arrays.items():
            _save(tmp / f"{key}.npy", np.ascontiguousarray(arr))
        _fsync_dir(tmp)
        os.replace(tmp, seg_dir / name)
        _fsync_dir(seg_dir)
        return name

    def compact(self) -> None:
        """Merge all segments of the committed version into one (atomic); removes the old segments afterwards.
        Readers that opened an older version keep reading it."""
        if self.staged:
            raise StoreError(f"{self.root}: commit the store before compacting it")
        with self._locked():
            current, latest = _read_current(self.root)
            segs = list(latest["segments"])
            if len(segs) <= 1:
                return
            cols = _load_segments(self.root, segs, latest["meta"])
            name = self._write_segment({k: np.concatenate(v) for k, v in cols.items()})
            self._publish({**latest, "segments": [name], "version": latest["version"] + 1}, replaces=current)
            for s in segs:
                shutil.rmtree(self.root / "segments" / s, ignore_errors=True)

    def gc(self, min_age_s: float = 600.0) -> None:
        """Remove segment folders and temporaries not named by the current manifest (left by crashes) that are
        older than ``min_age_s``, or at once when they are temporaries of a writer no longer running: a
        :meth:`create` staging into the same folder writes its segments outside the lock, and must not lose them
        to a concurrent gc."""
        with self._locked():
            _, latest = _read_current(self.root)
            live = set(latest["segments"])
            cutoff = time.time() - min_age_s
            for p in (self.root / "segments").iterdir():
                if p.name not in live and (p.stat().st_mtime <= cutoff or _writer_is_gone(p.name)):
                    shutil.rmtree(p, ignore_errors=True)
            for p in self.root.glob(".*tmp-*"):
                # a dead writer's temporary (.CURRENT/.manifest-…/.PENDING.json.tmp-PID: a kill -9 inside
                # save_atomic) goes at once, as its segment temporaries do; it used to stay for min_age_s
                if p.stat().st_mtime <= cutoff or _writer_is_gone(p.name):
                    p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reads
    def _segments(self) -> dict[str, list[np.ndarray]]:
        if self._parts is None:
            self._parts = _load_segments(self.root, self.manifest["segments"], self.meta)
        return self._parts

    def read(self, name: str, seq: np.ndarray | None = None) -> np.ndarray:
        """A stored column whole (no copy for a one-segment store), or its values at the store rows ``seq``."""
        return self._key_column(name) if seq is None else self._take(name, np.asarray(seq, np.int64))

    def _key_column(self, name: str) -> np.ndarray:
        """A column whole: the history index is built over the key columns (user, ts)."""
        if self._cache is not None:
            return self._cache[name]
        parts = self._segments()[name]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _take(self, name: str, rows: np.ndarray) -> np.ndarray:
        """``column[rows]`` read from the segments' memory maps, one gather per segment: a fetch never
        concatenates the payloads of every segment into RAM (a store appended to daily has hundreds)."""
        if self._cache is not None:
            return self._cache[name][rows]
        parts = self._segments()[name]
        if len(parts) == 1:
            return parts[0][rows]
        bounds = np.cumsum([0] + [len(p) for p in parts])
        flat = rows.reshape(-1)
        seg = np.searchsorted(bounds, flat, side="right") - 1
        order = np.argsort(seg, kind="stable")
        ends = np.cumsum(np.bincount(seg, minlength=len(parts)))
        out = np.empty((len(flat), *parts[0].shape[1:]), parts[0].dtype)
        start = 0
        for i, end in enumerate(ends):  # a loop over segments, not rows
            if end > start:
                sel = order[start:end]
                out[sel] = parts[i][flat[sel] - bounds[i]]
            start = end
        return out.reshape(*rows.shape, *parts[0].shape[1:])

    def columns(self) -> dict[str, np.ndarray]:
        """Every stored column of this version, whole (memory maps, or RAM after :meth:`load_into_memory`)."""
        if self._cache is None:
            self._cache = {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in self._segments().items()}
        return self._cache

    def __len__(self) -> int:
        if self._cache is not None:
            return len(self._cache["ts"])
        return sum(len(p) for p in self._segments()["ts"])

    @property
    def index(self) -> HistoryIndex:
        if self._index is None:
            self._index = HistoryIndex(np.asarray(self._key_column("user")), np.asarray(self._key_column("ts")))
        return self._index

    def load_into_memory(self) -> LocalTokenStore:
        self._cache = {k: np.ascontiguousarray(v) for k, v in self.columns().items()}
        return self

    def fetch(self, users: np.ndarray, before_ts: np.ndarray, hist_len: int, dequantize: bool = True) -> Fetched:
        """The last ``hist_len`` tokens of each user strictly before each request time."""
        before_ts = np.asarray(before_ts, np.int64)
        stored = len(self)
        if stored == 0:
            h = HistoryIndex(np.zeros(1, np.int64), np.full(1, np.iinfo(np.int64).max // 4)).fetch(
                np.asarray(users), before_ts, hist_len
            )
        else:
            h = self.index.fetch(np.asarray(users), before_ts, hist_len)
        safe = np.where(h.mask, h.rows, 0)
        payload = (
            self._take("payload", safe)
            if stored
            else np.zeros((len(users), hist_len, *self.meta["payload_shape"]), self.payload_dtype)
        )
        scale = None
        if self.meta["dtype"] == "int8":
            scale = self._take("scale", safe) if stored else np.zeros((len(users), hist_len), np.float32)
        payload = decode_payload(payload, scale, self.meta["dtype"], dequantize)
        payload[~h.mask] = 0
        if stored:
            response_mask = h.mask[:, :, None] & (self._take("known_at", safe) < before_ts[:, None, None])
            responses = np.where(response_mask, self._take("responses", safe), 0.0).astype(np.float32)
        else:
            a = len(self.meta["responses"])
            response_mask = np.zeros((len(users), hist_len, a), bool)
            responses = np.zeros((len(users), hist_len, a), np.float32)
        gap = h.gap / np.float32(self.meta.get("ticks_per_second", 1))  # seconds, whatever the log's unit
        return Fetched(
            payload=payload, responses=responses, response_mask=response_mask, mask=h.mask, gap=gap, seq=h.rows
        )

    def close(self) -> None:
        """Drop this reader's memory maps (the store on disk is unchanged)."""
        self._cache, self._parts, self._index = None, None, None

    def bytes_per_instance(self) -> dict[str, float]:
        c = self.columns()
        n = max(len(c["ts"]), 1)
        payload = c["payload"].nbytes + (c["scale"].nbytes if "scale" in c else 0)
        keys = c["instance_id"].nbytes + c["user"].nbytes + c["ts"].nbytes
        responses = c["responses"].nbytes + c["known_at"].nbytes
        return {
            "payload": payload / n,
            "keys": keys / n,
            "responses": responses / n,
            "total": (payload + keys + responses) / n,
        }


PENDING = "PENDING.json"  # a multi-store commit's intent record (see commit_appends)


def commit_appends(
    writes: Sequence[tuple[LocalTokenStore, dict[str, np.ndarray], dict | None]], unique: bool = False
) -> bool:
    """Append checked arrays to committed stores in **one commit**: every store shows all of its write or none
    does, to any reader, across crashes. Returns False (and writes nothing) when ``unique`` and the first
    write's instance ids are stored already with the same content (a retried event); other content under a
    stored id is a :class:`~sampletok.errors.ConflictError`.

    One store: its new manifest, then ``CURRENT`` (the commit point). Several: every store's segment and
    manifest are written under all their locks; a ``PENDING.json`` naming them goes to each secondary store,
    then to the first (the commit point); the ``CURRENT`` files switch; the records are removed, the first
    last. A crash before the first's record leaves every store as it was; after it, the next :meth:`open` of
    any of them finishes the commit (:func:`recover`)."""
    stores = [w[0] for w in writes]
    if len({s.root.resolve() for s in stores}) != len(stores):
        raise StoreError("commit_appends: one write per store")
    for store in stores:
        if store.staged:
            raise StoreError(f"{store.root}: commit the store before appending to it together with others")
    with _locked_all(stores):
        latest = [_current_of(store) for store in stores]
        if unique and _stored_already(stores[0], writes[0][1], latest[0][1]):
            return False
        staged = []
        merged: list[tuple[LocalTokenStore, list[str]]] = []
        for (store, arrays, meta_update), (current, manifest) in zip(writes, latest, strict=True):
            keep, tail = _merge_plan(store.root, manifest["segments"], len(arrays["ts"]))
            if tail:  # the small trailing segments merge into the new one: O(log n) segments, amortized
                old = _load_segments(store.root, tail, manifest["meta"])
                arrays = {k: np.concatenate([*old[k], v]) for k, v in arrays.items()}
                del old
                merged.append((store, tail))
            name = store._write_segment(arrays)  # under the lock, so a concurrent gc cannot take it
            new = {
                **manifest,
                "meta": {**manifest["meta"], **(meta_update or {})},
                "segments": keep + [name],
                "version": manifest["version"] + 1,
            }
            staged.append((store, store._write_manifest(new), new, current))
        _commit_staged(staged)
        for store, tail in merged:  # readers of older versions keep their memory maps (POSIX)
            for seg in tail:
                shutil.rmtree(store.root / "segments" / seg, ignore_errors=True)
        return True


def commit_late_responses(stores: Sequence[LocalTokenStore], late: LateResponses) -> int:
    """Set the late responses of one stored instance in every store holding it (the event store first: it must
    hold the instance, else a NotFoundError) in **one commit**, as :func:`commit_appends` does: the segment
    holding the row is rewritten with the new values (copy on write; readers of older versions keep theirs).
    Returns the instance's timestamp."""
    if not stores:
        raise StoreError("commit_late_responses: no store")
    with _locked_all(stores):
        staged, dropped, ts = [], [], None
        for k, store in enumerate(stores):
            current, manifest = _current_of(store)
            found = _find_instance(store.root, manifest, late.instance_id, late.user)
            if found is None:
                if k == 0:
                    raise NotFoundError(f"no stored event with this id for user {late.user}")
                continue  # a store that never held it (no token for this event)
            seg, row = found
            cols = {key: np.array(v[0]) for key, v in _load_segments(store.root, [seg], manifest["meta"]).items()}
            ts = int(cols["ts"][row]) if ts is None else ts
            cols["responses"][row], cols["known_at"][row] = late.applied(
                int(cols["ts"][row]), cols["responses"][row], cols["known_at"][row], "event"
            )
            name = store._write_segment(cols)
            segments = [name if x == seg else x for x in manifest["segments"]]
            new = {**manifest, "segments": segments, "version": manifest["version"] + 1}
            staged.append((store, store._write_manifest(new), new, current))
            dropped.append((store, seg))
        _commit_staged(staged)
        for store, seg in dropped:
            shutil.rmtree(store.root / "segments" / seg, ignore_errors=True)
        assert ts is not None
        return ts


@contextmanager
def _locked_all(stores: Sequence[LocalTokenStore]) -> Iterator[None]:
    """Every store's writer lock, taken in one order (by resolved root): two multi-store writers never deadlock."""
    with ExitStack() as stack:
        for store in sorted(stores, key=lambda st: str(st.root.resolve())):
            stack.enter_context(store._locked())
        yield


def _current_of(store: LocalTokenStore) -> tuple[str, dict]:
    """(name, content) of the store's current manifest (caller holds its lock). Another process may have
    committed since we opened: a write builds on what is current now, unless the store was replaced by another
    one (other producer, shape or labels) since, which is a StoreError."""
    current, manifest = _read_current(store.root)
    if manifest["meta"] != store.meta:
        raise StoreError(
            f"{store.root}: the store was replaced since it was opened (producer "
            f"{manifest['meta'].get('producer')}, was {store.meta.get('producer')}); open it again"
        )
    return current, manifest


def _commit_staged(staged: list[tuple[LocalTokenStore, str, dict, str]]) -> None:
    """Make written manifests current: one store by its ``CURRENT`` alone, several through a commit record."""
    if len(staged) == 1:
        store, name, new, current = staged[0]
        if store.on_before_commit is not None:
            store.on_before_commit()
        store._switch(name, new, replaces=current)
    else:
        _commit_together(staged[0][0].root, staged)


def _find_instance(root: Path, manifest: dict, instance_id: int, user: int) -> tuple[str, int] | None:
    """(segment, row) of the user's instance ``instance_id`` in a version, newest segment first, or None."""
    for seg in reversed(manifest["segments"]):
        folder = root / "segments" / seg
        iid = np.load(folder / "instance_id.npy", mmap_mode="r")
        rows = np.flatnonzero(np.asarray(iid) == instance_id)
        if len(rows):
            users = np.load(folder / "user.npy", mmap_mode="r")
            mine = rows[np.asarray(users)[rows] == user]
            if len(mine):
                return seg, int(mine[-1])
    return None


def _merge_plan(root: Path, segments: list[str], new_rows: int) -> tuple[list[str], list[str]]:
    """(segments kept, trailing segments merged into the new one): trailing segments no larger than what
    merges after them, as a binary counter does, so a store appended to one event at a time holds about
    log2(events) segments (and their open memory maps), and each row is rewritten about log2(events) times."""
    rows = new_rows
    cut = len(segments)
    while cut > 0:
        n = _segment_rows(root, segments[cut - 1])
        if n > rows:
            break
        rows += n
        cut -= 1
    return segments[:cut], segments[cut:]


def _segment_rows(root: Path, name: str) -> int:
    with open(root / "segments" / name / "ts.npy", "rb") as fh:  # the .npy header only
        major, _ = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read(fh)
    return int(shape[0])


def _commit_together(primary: Path, staged: list[tuple[LocalTokenStore, str, dict, str]]) -> None:
    """Switch several stores' written manifests in one commit, through a ``PENDING.json`` record."""
    record = {
        "txn": uuid.uuid4().hex,
        "stores": [
            {"root": os.path.relpath(st.root, primary), "manifest": name, "replaces": cur}
            for st, name, _, cur in staged
        ],
    }
    for st, *_ in staged[1:]:  # prepared: a secondary names the first store, whose record decides
        _write_record(st.root, {**record, "primary": os.path.relpath(primary, st.root)})
    first = staged[0][0]
    if first.on_before_commit is not None:
        first.on_before_commit()
    _write_record(primary, record)  # the commit point
    for st, name, new, cur in reversed(staged):  # the first store last: who sees its rows sees the rest
        st._switch(name, new, replaces=cur)
    (primary / PENDING).unlink()
    for st, *_ in staged[1:]:
        (st.root / PENDING).unlink(missing_ok=True)


def _write_current(root: Path, manifest_name: str) -> None:
    save_atomic(root / "CURRENT", lambda fh: fh.write(manifest_name), binary=False)
    _fsync_dir(root)


def _write_record(root: Path, record: dict) -> None:
    save_atomic(root / PENDING, lambda fh: json.dump(record, fh), binary=False)
    _fsync_dir(root)


def recover(root: str | Path) -> None:
    """Finish or undo the multi-store commit a crash cut off (:func:`commit_appends`), under every store's lock.
    The first store's record is the commit point: present, every store switches to its new manifest; absent,
    a secondary whose ``CURRENT`` is not the named manifest was never committed, and keeps its old state."""
    root = Path(root)
    try:
        record = json.loads((root / PENDING).read_text())
    except FileNotFoundError:
        return
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{root / PENDING}: unreadable commit record: {e}") from None
    primary = (root / record["primary"]).resolve() if "primary" in record else root.resolve()
    roots = [(primary / s["root"]).resolve() for s in record["stores"]]
    with ExitStack() as stack:
        for r in sorted(roots, key=str):
            stack.enter_context(locked(r / "LOCK"))
        try:
            decided = json.loads((primary / PENDING).read_text()).get("txn") == record["txn"]
        except (OSError, json.JSONDecodeError):
            decided = False
        for r, s in zip(roots, record["stores"], strict=True):
            if decided and (r / s["manifest"]).exists():
                _write_current(r, s["manifest"])
        if decided:
            (primary / PENDING).unlink(missing_ok=True)
        for r in roots:
            own = r / PENDING
            try:
                if json.loads(own.read_text()).get("txn") == record["txn"]:
                    own.unlink()
            except (OSError, json.JSONDecodeError):
                pass


def _stored_already(store: LocalTokenStore, arrays: dict[str, np.ndarray], manifest: dict) -> bool:
    """Whether every instance id of ``arrays`` is in the store's current version with the same content (a
    retry: True), none is (False), or a ConflictError: an id reused for other content, or a partial retry."""
    mapped = store.version == manifest["version"] and store.manifest_name  # this reader's version is current
    current = store._segments() if mapped else _load_segments(store.root, manifest["segments"], manifest["meta"])
    stored_iid = np.concatenate(current["instance_id"])
    hit = np.flatnonzero(np.isin(stored_iid, arrays["instance_id"]))
    if not len(hit):
        return False
    ids = stored_iid[hit]
    if len(np.unique(ids)) != len(np.unique(arrays["instance_id"])):
        raise ConflictError(f"{store.root}: some of these instance ids are stored already, others are not")
    order = np.argsort(ids, kind="stable")
    for col, new in arrays.items():
        if col in ("responses", "known_at"):  # late responses (PATCH) may have changed them since
            continue
        # this reader's memory maps gather just the hit rows; a version it has not mapped is read whole (rare)
        old = store._take(col, hit[order]) if mapped else np.concatenate(current[col])[hit[order]]
        new = new[np.argsort(arrays["instance_id"], kind="stable")]
        if old.shape != new.shape or not np.array_equal(old, new):
            raise ConflictError(
                f"{store.root}: instance id {int(ids[0])} is stored already with other content ({col} differs); "
                "an event id names one event"
            )
    return True


def _read_current(root: Path) -> tuple[str, dict]:
    """(name, content) of the manifest ``CURRENT`` names; a one-line StoreError when there is none."""
    cur = root / "CURRENT"
    if not cur.exists():
        raise StoreError(f"{root}: not a token store (no CURRENT file; an export that did not finish leaves none)")
    name = cur.read_text().strip()
    try:
        manifest = json.loads((root / name).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{root / name}: unreadable manifest: {e}") from None
    check_format(str(root), manifest["meta"])
    return name, manifest


def _writer_is_gone(name: str) -> bool:
    """Whether ``name`` is a temporary (a segment's ``.seg-….tmp-PID``, or an atomic file write's, e.g.
    ``.CURRENT.tmp-PID``) whose writing process no longer runs on this host: a crash mid-append left it, and it
    can go at once."""
    if ".tmp-" not in name:
        return False
    pid = name.rsplit(".tmp-", 1)[1]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def _load_segments(root: Path, segments: list[str], meta: dict) -> dict[str, list[np.ndarray]]:
    """Memory maps of every column of the given segments (empty arrays of the right shape when none)."""
    parts: dict[str, list[np.ndarray]] = {}
    need = {"instance_id", "user", "ts", "responses", "known_at", "payload"} | (
        {"scale"} if meta["dtype"] == "int8" else set()
    )
    for s in segments:
        files = {f.stem: f for f in (root / "segments" / s).glob("*.npy")}
        if not need <= set(files):  # never read a version with a missing segment as a smaller store
            raise StoreError(
                f"{root}: segment {s} of the manifest is missing or incomplete "
                f"(lacks {sorted(need - set(files))}); the store is corrupt, export it again"
            )
        for stem in sorted(files):
            parts.setdefault(stem, []).append(np.load(files[stem], mmap_mode="r"))
    if not parts:
        shape = tuple(meta["payload_shape"])
        a = len(meta["responses"])
        parts = {
            "instance_id": [np.zeros(0, np.int64)],
            "user": [np.zeros(0, np.int64)],
            "ts": [np.zeros(0, np.int64)],
            "responses": [np.zeros((0, a), np.float32)],
            "known_at": [np.zeros((0, a), np.int64)],
            "payload": [np.zeros((0, *shape), PAYLOAD_DTYPES[meta["dtype"]])],
        }
        if meta["dtype"] == "int8":
            parts["scale"] = [np.zeros(0, np.float32)]
    return parts
