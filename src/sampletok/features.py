"""The tensors every model reads, built from the schema and the fitted vocabulary sizes: :class:`FeatureLayout`
(the column order of a batch) and :class:`Batch` (one batch). A leaf module: models and layers depend on it,
never on the data stage that fills it (:mod:`sampletok.data.batches`), so a model is a function of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import numpy as np
import torch

from sampletok.schema import FeatureField, FieldType, Schema


class _FittedDataset(Protocol):
    """What a layout needs of a prepared dataset (any object with these, e.g. a fitted encoder)."""

    schema: Schema

    def vocab_size(self, field_name: str) -> int: ...

    def response_vocab_size(self, name: str) -> int: ...


@dataclass
class FeatureLayout:
    """Column order of the batch tensors, derived from the schema and the fitted vocabularies."""

    cat_fields: list[FeatureField]  # categorical and bucketized numerics
    multi_fields: list[FeatureField]
    num_fields: list[FeatureField]
    vocab_sizes: dict[str, int]
    task_labels: list[str]
    responses: list[str]  # what a past row adds to its features: task labels, then declared responses
    seq_cat: list[str]  # sequence fields that are categorical (first one is the item id)
    seq_multi: list[str]
    multi_len: int
    groups: dict[str, str]
    features: list[FeatureField] | None = None  # every field in schema order (SIF sub-token assignment)
    response_vocab_sizes: dict[str, int] = field(default_factory=dict)  # categorical responses (others: value)

    @classmethod
    def from_dataset(cls, ds: _FittedDataset) -> FeatureLayout:
        s: Schema = ds.schema
        cat = [f for f in s.features if f.type != FieldType.multi_categorical and f.is_categorical_like]
        multi = [f for f in s.features if f.type == FieldType.multi_categorical]
        num = [f for f in s.features if not f.is_categorical_like]
        seq = s.sequence.fields if s.sequence else []
        return cls(
            cat_fields=cat,
            multi_fields=multi,
            num_fields=num,
            vocab_sizes={f.name: ds.vocab_size(f.name) for f in s.features if f.is_categorical_like},
            task_labels=s.task_labels,
            responses=s.response_names,
            seq_cat=[f for f in seq if s.field(f).type == FieldType.categorical],
            seq_multi=[f for f in seq if s.field(f).type == FieldType.multi_categorical],
            multi_len=max([f.max_len for f in multi], default=1),
            groups={f.name: f.group for f in s.features},
            features=list(s.features),
            response_vocab_sizes={r: v for r in s.response_names if (v := ds.response_vocab_size(r))},
        )

    @property
    def n_fields(self) -> int:
        return len(self.cat_fields) + len(self.multi_fields) + len(self.num_fields)

    def sequence_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the sequence fields among ``cat_fields`` and among ``multi_fields`` (int64 arrays): the
        columns a history row keeps."""
        cat = {f.name: i for i, f in enumerate(self.cat_fields)}
        multi = {f.name: i for i, f in enumerate(self.multi_fields)}
        return (
            np.array([cat[f] for f in self.seq_cat], dtype=np.int64),
            np.array([multi[f] for f in self.seq_multi], dtype=np.int64),
        )

    @property
    def field_names(self) -> list[str]:
        """Order of field tokens produced by :class:`~sampletok.nn.embedding.FeatureEmbedding`."""
        return [f.name for f in self.cat_fields + self.multi_fields + self.num_fields]


@dataclass(frozen=True)
class TokenInput:
    """The token input a model reads, declared by the model (:attr:`RankingModel.token_input`) and served by
    the token method of its ``kind`` (:mod:`sampletok.tokens`): ``store`` is a given store's location (None:
    the method builds or finds one), ``hist_len`` the tokens per request (None: the run's ``hist_len``)."""

    kind: str  # "iat" (instance embeddings) or "sif" (sample codes)
    store: str | None = None
    hist_len: int | None = None


@dataclass
class HistoryTokens:
    """Tokens a token store returned for a batch's requests (IAT instance embeddings or SIF codes): the last
    ``k`` of each user strictly before the request, right-aligned, responses zeroed unless known."""

    payload: torch.Tensor  # [B, k, *payload_shape] float32 embeddings or int64 codes
    responses: torch.Tensor  # [B, k, R] float32, 0 where not yet known
    response_mask: torch.Tensor  # [B, k, R] bool
    mask: torch.Tensor  # [B, k] bool
    gap: torch.Tensor  # [B, k] float32 seconds before the request

    def to(self, device: torch.device | str) -> HistoryTokens:
        return HistoryTokens(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


@dataclass
class Batch:
    """Tensors of one batch. Shapes: B requests, F_c categorical, F_m multi (padded to L_m), F_n numeric,
    n history positions (right-aligned, most recent last), S_c/S_m sequence fields, Y task labels, R responses
    (:attr:`FeatureLayout.responses`: the task labels, then the schema's responses).

    Optional parts, filled by the loader for the models that read them (a model never fetches anything):
    ``history_samples`` (the distinct history rows of the batch as whole samples, their own features, for
    models that read past samples, e.g. SIF) with ``history_sample_index`` ([B, n] position of each history
    row in it, -1 where padded), and ``tokens`` (what a token store holds for the requests).
    ``shared_history`` says every row has the same history (a served request's candidates): a model may
    compute its history pass once."""

    cat: torch.Tensor  # [B, F_c] int64
    multi: torch.Tensor  # [B, F_m, L_m] int64
    num: torch.Tensor  # [B, F_n] float32
    labels: torch.Tensor  # [B, Y] float32
    hist_cat: torch.Tensor  # [B, n, S_c] int64 (0 where padded)
    hist_multi: torch.Tensor  # [B, n, S_m, L_m] int64
    hist_mask: torch.Tensor  # [B, n] bool
    hist_gap: torch.Tensor  # [B, n] float32 seconds between history row and request
    hist_rows: torch.Tensor  # [B, n] int64 dataset row ids, -1 where padded
    hist_responses: torch.Tensor  # [B, n, R] float32 value or vocabulary code, 0 where not yet known
    hist_response_mask: torch.Tensor  # [B, n, R] bool, True where known before the request
    user: torch.Tensor  # [B] int64 user key (GAUC groups)
    ts: torch.Tensor  # [B] int64 request time
    rows: torch.Tensor  # [B] int64 dataset row ids of the requests
    history_samples: Batch | None = None
    history_sample_index: torch.Tensor | None = None  # [B, n] int64
    tokens: HistoryTokens | None = None
    shared_history: bool = False  # every row has the same history (one request's candidates)

    def to(self, device: torch.device | str) -> Batch:
        def move(x):
            if x is None or isinstance(x, bool):
                return x
            return x.to(device) if isinstance(x, Batch | HistoryTokens) else x.to(device, non_blocking=True)

        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def __len__(self) -> int:
        return self.cat.shape[0]

    def trimmed_history(self) -> Batch:
        """This batch without the history positions that are padding in every row (the oldest: history is
        right-aligned). Exact for models that read history positions only through their masks and time gaps
        (SIF, DIN); not for models with absolute position embeddings. Data-dependent: eager mode only."""
        n = self.hist_mask.shape[1]
        used = self.hist_mask.any(0)  # positions valid in some row; kept from the oldest of them on
        if n == 0 or len(self) == 0 or bool(used[0]):
            return self
        keep = max(n - int(used.int().argmax()), 1) if bool(used.any()) else 1
        cut = slice(n - keep, n)
        parts = ("hist_cat", "hist_multi", "hist_mask", "hist_gap", "hist_rows", "hist_responses", "hist_response_mask")
        trimmed: dict[str, Any] = {name: getattr(self, name)[:, cut] for name in parts}
        if self.history_sample_index is not None:
            trimmed["history_sample_index"] = self.history_sample_index[:, cut]
        if self.tokens is not None and self.tokens.mask.shape[1] == n:
            trimmed["tokens"] = HistoryTokens(
                **{f.name: getattr(self.tokens, f.name)[:, cut] for f in fields(self.tokens)}
            )
        return replace(self, **trimmed)
