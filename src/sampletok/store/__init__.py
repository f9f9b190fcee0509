"""Token stores. One interface for both methods: IAT writes float embeddings, SIF writes integer codes.

``LocalTokenStore`` (a directory of memory-mapped segments) is the embedded default; another backend
(e.g. Redis) implements the same ``append`` / ``fetch`` / ``meta`` surface.
"""

from sampletok.store.local import Fetched, LocalTokenStore

__all__ = ["Fetched", "LocalTokenStore"]
