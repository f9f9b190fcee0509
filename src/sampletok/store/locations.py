"""Opening a store by its location: a directory path (:class:`~sampletok.store.local.LocalTokenStore`) or a
``redis://host:port/db?store=NAME`` URL (:class:`~sampletok.store.redis.RedisTokenStore`, imported only then:
the ``redis`` extra is optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sampletok.store.base import TokenStore


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
