"""Opening a store by its location: a directory path (:class:`~sampletok.store.local.LocalTokenStore`) or a
``redis://host:port/db?store=NAME`` URL (:class:`~sampletok.store.redis.RedisTokenStore`, imported only then:
the ``redis`` extra is optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sampletok.errors import StoreError
from sampletok.store.base import Instances, LateResponses, TokenStore


def is_redis_url(location: str | Path) -> bool:
    return str(location).startswith(("redis://", "rediss://", "unix://"))


def create_store(
    location: str | Path,
    producer: str,
    payload_shape: tuple[int, ...],
    response_names: list[str],
    dtype: str,
    extra_meta: dict | None = None,
    overwrite: bool = False,
) -> TokenStore:
    """A new store, staged until ``commit()``, at a directory path (local) or a ``redis://`` URL."""
    kw: dict[str, Any] = dict(
        producer=producer, payload_shape=payload_shape, response_names=response_names, dtype=dtype
    )
    if is_redis_url(location):
        from sampletok.store.redis import RedisTokenStore

        return RedisTokenStore.create(str(location), **kw, extra_meta=extra_meta, overwrite=overwrite)
    from sampletok.store.local import LocalTokenStore

    return LocalTokenStore.create(location, **kw, extra_meta=extra_meta, overwrite=overwrite)


def open_store(location: str | Path) -> TokenStore:
    """The committed store at a directory path (local) or a ``redis://host:port/db?store=NAME`` URL."""
    if is_redis_url(location):
        from sampletok.store.redis import RedisTokenStore

        return RedisTokenStore.open(str(location))
    from sampletok.store.local import LocalTokenStore

    return LocalTokenStore.open(location)


def store_exists(location: str | Path) -> bool:
    """Whether a store was ever committed at ``location`` (any other trouble is an error, never a rebuild that
    would drop appended events)."""
    if is_redis_url(location):
        from sampletok.store.redis import RedisTokenStore

        return RedisTokenStore.exists(location)
    from sampletok.store.local import LocalTokenStore

    return LocalTokenStore.exists(location)


def append_together(writes: list[tuple[TokenStore, Instances]], unique: bool = False) -> bool:
    """Append to several committed stores of one backend in **one commit**: an event and its token are both
    visible to every reader or neither is, across crashes (local: one commit record; Redis: one Lua script on
    one server). With ``unique``, a first write whose instance ids are stored already with the same content
    writes nothing and returns False (a retried event is stored once); other content under a stored id is a
    :class:`~sampletok.errors.ConflictError`. Returns True when written.

    Example:
        >>> import numpy as np, tempfile
        >>> from sampletok.store.local import LocalTokenStore
        >>> def empty(root):
        ...     s = LocalTokenStore.create(root, producer="p", payload_shape=(1,), response_names=[], dtype="float32")
        ...     s.commit()
        ...     return s
        >>> base = tempfile.mkdtemp()
        >>> a, b = empty(base + "/events"), empty(base + "/tokens")
        >>> one = Instances(np.array([5]), np.array([1]), np.array([10]), np.array([[0.5]]))
        >>> append_together([(a, one), (b, one)], unique=True), append_together([(a, one), (b, one)], unique=True)
        (True, False)
        >>> len(LocalTokenStore.open(base + "/events")), len(LocalTokenStore.open(base + "/tokens"))
        (1, 1)
    """
    if not writes:
        return False
    from sampletok.store.local import LocalTokenStore

    if all(isinstance(st, LocalTokenStore) for st, _ in writes):
        from sampletok.store.local import commit_appends

        checked = []
        for st, rows in writes:
            assert isinstance(st, LocalTokenStore)
            arrays = st._checked(*rows)
            st._refuse_unindexable(arrays["user"], arrays["ts"])
            checked.append((st, arrays, None))
        return commit_appends(checked, unique=unique)
    from sampletok.store.redis import RedisTokenStore

    if all(isinstance(st, RedisTokenStore) for st, _ in writes):
        from sampletok.store.redis import commit_appends as redis_commit

        return redis_commit([(st, tuple(rows)) for st, rows in writes], unique=unique)  # type: ignore[misc]
    raise StoreError("stores appended together must share one backend (all local, or all on one Redis server)")


def update_responses_together(stores: list[TokenStore], late: LateResponses) -> int:
    """Set late responses of one stored instance in every store holding it (the event store first, which must
    hold it: else a NotFoundError), in one commit, as :func:`append_together` appends: a reader sees the new
    responses in every store or in none. Returns the instance's timestamp."""
    from sampletok.store.local import LocalTokenStore

    if all(isinstance(st, LocalTokenStore) for st in stores):
        from sampletok.store.local import commit_late_responses

        return commit_late_responses([st for st in stores if isinstance(st, LocalTokenStore)], late)
    from sampletok.store.redis import RedisTokenStore

    if all(isinstance(st, RedisTokenStore) for st in stores):
        from sampletok.store.redis import commit_late_responses as redis_update

        return redis_update([st for st in stores if isinstance(st, RedisTokenStore)], late)
    raise StoreError("stores updated together must share one backend (all local, or all on one Redis server)")
