"""Token stores. One contract (:class:`~sampletok.store.base.TokenStore`) for both methods: IAT writes float
embeddings, SIF writes integer codes.

``LocalTokenStore`` (a directory of memory-mapped segments) is the embedded default; ``RedisTokenStore``
(``sampletok.store.redis``, the ``redis`` extra) serves the same ``append`` / ``fetch`` / ``meta`` from a
Redis server. ``open_store`` opens either from a path or a ``redis://`` URL.
"""

from sampletok.store.base import Fetched, TokenStore
from sampletok.store.local import LocalTokenStore
from sampletok.store.locations import create_store, open_store, store_exists

__all__ = ["Fetched", "LocalTokenStore", "TokenStore", "create_store", "open_store", "store_exists"]
