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
    # each response's type: "binary" (task labels too), "numeric" or "categorical" (absent: a task label is
    # binary, any other value response numeric); what a response head (sampletok.nn.ResponseHeads) predicts
    response_types: dict[str, str] = field(default_factory=dict)

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
            response_types={**{label: "binary" for label in s.task_labels}, **{r.name: r.type for r in s.responses}},
        )

    @classmethod
    def example(cls) -> FeatureLayout:
        """A small layout for examples and tests that need no dataset: user and item ids, a genre list, an hour
        bucket and a price; the item id (and its genres) as the sequence; task label ``click``, response
        ``rating`` (a 5-value categorical).

        Example:
            >>> FeatureLayout.example().field_names
            ['user_id', 'item_id', 'hour', 'genres', 'price']
        """
        cat = FieldType.categorical
        fs = [
            FeatureField(name="user_id", type=cat, group="user"),
            FeatureField(name="item_id", type=cat, group="item"),
            FeatureField(name="hour", type=cat, group="context"),
            FeatureField(name="genres", type=FieldType.multi_categorical, group="item", max_len=3),
            FeatureField(name="price", type=FieldType.numeric, group="item"),
        ]
        return cls(
            cat_fields=fs[:3],
            multi_fields=fs[3:4],
            num_fields=fs[4:],
            vocab_sizes={"user_id": 32, "item_id": 52, "hour": 26, "genres": 12},
            task_labels=["click"],
            responses=["click", "rating"],
            seq_cat=["item_id"],
            seq_multi=["genres"],
            multi_len=3,
            groups={f.name: f.group for f in fs},
            features=fs,
            response_vocab_sizes={"rating": 7},
            response_types={"click": "binary", "rating": "categorical"},
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
    ``history_group`` ([B], contiguous groups numbered from 0) says which rows share one history (a served
    request's candidates; a served batch of several requests): a model may compute its history pass once per
    group, on the group's first row (:meth:`history_heads`), and spread it with :meth:`expand_history`.

    ``responses`` ([B, R], with ``response_mask`` [B, R], True where the row has that outcome) are the request
    rows' own outcomes, filled by the offline loader only: **targets** of auxiliary response heads
    (:class:`~sampletok.nn.ResponseHeads`), never a model input (a test checks that no model's score reads
    them); serving leaves them None, and history samples never carry them."""

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
    history_group: torch.Tensor | None = None  # [B] int64 rows with one value share one history (None: own)
    tokens_by_group: bool = False  # tokens hold one row per history group, not per row: see group_tokens
    responses: torch.Tensor | None = None  # [B, R] float32 the rows' own outcomes (targets only), offline only
    response_mask: torch.Tensor | None = None  # [B, R] bool, True where the row has the outcome

    @classmethod
    def example(
        cls, layout: FeatureLayout, batch_size: int = 4, hist_len: int = 8, history_samples: bool = False, seed: int = 0
    ) -> Batch:
        """A batch of random valid codes for ``layout`` (every code inside its vocabulary, histories of random
        lengths, responses known at random): what a model's doctest or a shape test feeds a model without
        preparing a dataset. ``history_samples`` adds each history row as a sample of its own (models that read
        past samples, e.g. SIF).

        Example:
            >>> b = Batch.example(FeatureLayout.example(), batch_size=2, hist_len=5)
            >>> tuple(b.cat.shape), tuple(b.hist_cat.shape), tuple(b.hist_responses.shape)
            ((2, 3), (2, 5, 1), (2, 5, 2))
        """
        g = torch.Generator().manual_seed(seed)
        b, n = batch_size, hist_len
        seq_cat, seq_multi = (torch.from_numpy(p) for p in layout.sequence_positions())

        def codes(fields_: list[FeatureField], shape: tuple[int, ...]) -> torch.Tensor:
            highs = torch.tensor([layout.vocab_sizes[f.name] for f in fields_], dtype=torch.int64)
            return (torch.rand(*shape, len(fields_), generator=g) * (highs - 1)).long() + 1  # 1..V-1: no padding

        def own(k: int) -> dict[str, Any]:
            multi = codes(layout.multi_fields, (k, layout.multi_len)).transpose(1, 2) if layout.multi_fields else None
            return {
                "cat": codes(layout.cat_fields, (k,)),
                "multi": multi if multi is not None else torch.zeros(k, 0, layout.multi_len, dtype=torch.int64),
                "num": torch.randn(k, len(layout.num_fields), generator=g),
                "labels": (torch.rand(k, len(layout.task_labels), generator=g) < 0.5).float(),
                "user": torch.randint(0, 1 << 40, (k,), generator=g),
                "ts": torch.randint(1 << 20, 1 << 30, (k,), generator=g),
                "rows": torch.arange(k),
            }

        def history(k: int, length: int) -> dict[str, Any]:
            past = torch.randint(0, length + 1, (k,), generator=g)
            mask = torch.arange(length)[None, :] >= (length - past)[:, None]  # right-aligned
            rows = torch.where(mask, torch.arange(k * length).reshape(k, length), -1)
            r = len(layout.responses)
            highs = torch.tensor([layout.response_vocab_sizes.get(x, 2) for x in layout.responses], dtype=torch.int64)
            values = (torch.rand(k, length, r, generator=g) * (highs - 1)).floor()
            values = torch.where(
                torch.tensor([x in layout.response_vocab_sizes for x in layout.responses]), values + 1, values
            )
            known = mask[..., None] & (torch.rand(k, length, r, generator=g) < 0.8)
            item = own(k * length)
            return {
                "hist_cat": item["cat"][:, seq_cat].reshape(k, length, len(seq_cat)) * mask[..., None],
                "hist_multi": item["multi"][:, seq_multi].reshape(k, length, len(seq_multi), layout.multi_len)
                * mask[..., None, None],
                "hist_mask": mask,
                "hist_gap": torch.rand(k, length, generator=g) * 86400 * mask,
                "hist_rows": rows,
                "hist_responses": values * known,
                "hist_response_mask": known,
            }

        batch = cls(**own(b), **history(b, n))
        # the rows' own outcomes (targets of response heads): the task labels first, then the other responses
        r_highs = torch.tensor([layout.response_vocab_sizes.get(x, 2) for x in layout.responses], dtype=torch.float32)
        g_own = torch.Generator().manual_seed(seed + 1)  # its own stream: every other tensor is as before
        own_responses = (torch.rand(b, len(layout.responses), generator=g_own) * (r_highs - 1)).floor()
        own_responses += torch.tensor([float(x in layout.response_vocab_sizes) for x in layout.responses])
        for i, label in enumerate(layout.task_labels):
            if label in layout.responses:
                own_responses[:, layout.responses.index(label)] = batch.labels[:, i]
        batch.responses = own_responses
        batch.response_mask = torch.ones(b, len(layout.responses), dtype=torch.bool)
        if history_samples:
            valid = batch.hist_mask.reshape(-1)
            index = torch.full((b * n,), -1, dtype=torch.int64)
            index[valid] = torch.arange(int(valid.sum()))
            k = int(valid.sum())
            samples = cls(**own(k), **history(k, 0))
            # a history row's sequence fields are the same values in both views of it
            samples.cat[:, seq_cat] = batch.hist_cat.reshape(b * n, -1)[valid]
            if len(seq_multi):
                samples.multi[:, seq_multi] = batch.hist_multi.reshape(b * n, len(seq_multi), -1)[valid]
            samples.rows = batch.hist_rows.reshape(-1)[valid]
            batch.history_samples, batch.history_sample_index = samples, index.reshape(b, n)
        return batch

    def to(self, device: torch.device | str) -> Batch:
        def move(x):
            if x is None or isinstance(x, bool):
                return x
            return x.to(device) if isinstance(x, Batch | HistoryTokens) else x.to(device, non_blocking=True)

        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def __len__(self) -> int:
        return self.cat.shape[0]

    @property
    def grouped_history(self) -> bool:
        """Whether some rows share one history (so a history pass may run once per group)."""
        return self.history_group is not None and len(self) > 1

    def history_heads(self) -> torch.Tensor:
        """[G] the first row of each history group (every row when histories are not grouped).

        Example:
            >>> b = Batch.example(FeatureLayout.example(), batch_size=4)
            >>> b.history_group = torch.tensor([0, 0, 1, 1])
            >>> b.history_heads().tolist(), b.expand_history(torch.tensor([7, 9])).tolist()
            ([0, 2], [7, 7, 9, 9])
        """
        g = self.history_group
        if g is None:
            return torch.arange(len(self), device=self.cat.device)
        starts = torch.ones_like(g, dtype=torch.bool)
        starts[1:] = g[1:] != g[:-1]
        return torch.nonzero(starts).squeeze(1)

    def history_group_sizes(self) -> list[int]:
        """How many consecutive rows share each history (one per row when histories are not grouped)."""
        if self.history_group is None:
            return [1] * len(self)
        return torch.unique_consecutive(self.history_group, return_counts=True)[1].tolist()

    def group_tokens(self) -> HistoryTokens | None:
        """The tokens of each history group ([G, k, ...], one per row when histories are not grouped). A served
        batch of several requests holds them so (``tokens_by_group``): spreading IAT's [k, d] embeddings to
        every candidate row copied ~26 MB a forward at 4 requests of 100 candidates, for models that read one
        row per group."""
        if self.tokens is None or self.tokens_by_group or not self.grouped_history:
            return self.tokens
        heads = self.history_heads()
        return HistoryTokens(**{f.name: getattr(self.tokens, f.name)[heads] for f in fields(self.tokens)})

    def row_tokens(self) -> HistoryTokens | None:
        """The tokens of each row ([B, k, ...]): those of its history group, spread."""
        if self.tokens is None or not self.tokens_by_group:
            return self.tokens
        return HistoryTokens(**{f.name: self.expand_history(getattr(self.tokens, f.name)) for f in fields(self.tokens)})

    def expand_history(self, x: torch.Tensor) -> torch.Tensor:
        """[G, ...] one value per history group → [B, ...] one per row (a view when there is one group)."""
        if self.history_group is None or x.shape[0] == len(self):
            return x
        if x.shape[0] == 1:
            return x.expand(len(self), *x.shape[1:])
        return x[self.history_group]

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
