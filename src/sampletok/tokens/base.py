"""The token methods: one per kind of token input a model declares (:class:`~sampletok.features.TokenInput`),
each knowing how to open (or build) the store the model reads, check that a store is the one it was trained
with, and tokenize a served event. Dispatch is by the declared kind, never by the model's class.

>>> from sampletok.features import TokenInput
>>> sorted(METHODS)  # the kinds registered by sampletok.tokens
['iat', 'sif']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np

from sampletok.errors import ConfigError

if TYPE_CHECKING:
    from sampletok.data.batches import TokenSource
    from sampletok.data.dataset import PreparedDataset
    from sampletok.features import Batch
    from sampletok.models.base import RankingModel
    from sampletok.store.base import TokenStore


class EventTokenizer(Protocol):
    """What the service runs on a new event to append its tokens: the event's batch (its features and its
    ``hist_len`` most recent past events, strictly before it) → its stored payload [1, *payload_shape]."""

    hist_len: int

    def encode_event(self, batch: Batch) -> np.ndarray: ...


class TokenMethod(Protocol):
    """One kind of token input, bound to the model that reads it."""

    def open(
        self, ds: PreparedDataset, *, seed: int, hist_len: int, build: bool = True, progress: bool = True
    ) -> TokenSource:
        """The token source the model reads on ``ds``; ``build=False`` never trains a tokenizer (scoring)."""
        ...

    def check(self, store: TokenStore, dataset: str) -> None:
        """Refuse a store that is not what the model reads (its kind, shape, dataset or codebooks)."""
        ...

    def event_tokenizer(self, tokens: TokenSource, ds: PreparedDataset) -> EventTokenizer:
        """What tokenizes a served event for ``tokens`` (a ConfigError where the method cannot serve)."""
        ...


METHODS: dict[str, Callable[[RankingModel], TokenMethod]] = {}


def register_method(
    kind: str,
) -> Callable[[Callable[[RankingModel], TokenMethod]], Callable[[RankingModel], TokenMethod]]:
    def deco(cls: Callable[[RankingModel], TokenMethod]) -> Callable[[RankingModel], TokenMethod]:
        METHODS[kind] = cls
        return cls

    return deco


def token_method(model: RankingModel) -> TokenMethod | None:
    """The token method of the input ``model`` declares, or None for a model that reads no tokens."""
    declared = model.token_input
    if declared is None:
        return None
    if declared.kind not in METHODS:
        raise ConfigError(f"model '{model.name}' reads tokens of kind '{declared.kind}'; known: {sorted(METHODS)}")
    return METHODS[declared.kind](model)


def open_tokens(
    model: RankingModel, ds: PreparedDataset, *, seed: int, hist_len: int, build: bool = True, progress: bool = True
) -> TokenSource | None:
    """The token source ``model`` reads on ``ds`` (None for a model that reads none): the tokenizer step the
    experiment runs before training or scoring it."""
    method = token_method(model)
    return None if method is None else method.open(ds, seed=seed, hist_len=hist_len, build=build, progress=progress)
