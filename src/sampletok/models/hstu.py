"""HSTU-style ranker (Zhai et al., 2024, "Actions Speak Louder than Words"), as in the DLRM-v3 ranking model of
meta-recsys/generative-recommenders: the user's history is a sequence of events, each token the sum of the
item's **content** embedding and an **action** encoding of the event's responses (only those known at the
request, through the shared :class:`~sampletok.nn.ResponseEncoder`); contextual tokens (the request's
non-item fields) are prepended and the candidate (content + a learned "to be predicted" action) appended.

STU layers (pointwise-SiLU attention instead of softmax, normalized by the sequence length, gated by ``U``):

    U, V, Q, K = split(SiLU(W₁ · LN(X)))
    A = SiLU(Q Kᵀ / √d_h + rab(Δt, Δpos)) / n ⊙ mask
    X ← X + W₂ · (LN(A V) ⊙ U)                      (concat_ux: X + W₂ · [U, A V, U ⊙ LN(A V)])

with a relative attention bias from log-bucketed time gaps and relative positions (one learned scalar per
bucket, as generative-recommenders' ``RelativeBucketedTimeAndPositionBasedBias``). History tokens attend
causally (to earlier events and the context), the candidate to every event: it never sees itself as history.
The head reads the candidate's output and the request's field embeddings.

The pieces of DLRM-v3 (``modules/dlrm_hstu.py``, ``modules/preprocessors.py``, ``modules/stu.py``,
``modules/positional_encoder.py``, ``modules/multitask_module.py``) are options, each off by default so that a
saved model (whose config predates them) rebuilds as it was trained; DLRM-v3 itself runs with all of them on:

- ``concat_ux``: each layer's output projection reads ``[u, attn, u ⊙ LN(attn)]`` (3 × width) instead of
  ``u ⊙ LN(attn)`` (DLRM-v3's STULayer: ``concat_u=True, concat_x=True``).
- ``encoders="mlp"``: the content and action encoders are ``Linear → SwishLayerNorm → Linear → LayerNorm``
  (the ContextualPreprocessor's ``_content_embedding_mlp`` / ``_action_embedding_mlp``) and the head's hidden
  layers use :class:`~sampletok.nn.SwishLayerNorm` instead of ReLU (DLRM-v3's prediction module).
- ``context_tokens="per_feature"``: one token per contextual feature (every request field that is neither
  an item field nor a sequence field), each with its own linear map (the ContextualPreprocessor's batched
  contextual weights), instead of one token from every field.
- ``time_embeddings``: a learned embedding of each token's time gap bucket, ``int(ln(gap / 60 s))`` clamped
  to [0, 32], added to the event and candidate tokens (HSTUPositionalEncoder's timestamp embeddings).
- ``relative_bias`` (on by default, as DLRM-v3): the relative attention bias above; off, the STU layers see
  time gaps only through ``time_embeddings`` and order only through the causal mask (an ablation: what HSTU
  gains from the bias).
- ``aux_responses``: multitask heads (:class:`~sampletok.nn.ResponseHeads`: ``Linear → SwishLayerNorm →
  Linear``) over ``user ⊙ item`` (the candidate's output and its content embedding, as DLRM-v3's multitask
  module) predict the request's responses as auxiliary losses, weight ``aux_weight`` (DLRM-v3: 0.2).

Example:
    >>> from sampletok.features import Batch, FeatureLayout
    >>> model = HSTU(FeatureLayout.example())
    >>> model(Batch.example(model.layout, batch_size=4, hist_len=8)).logits.shape
    torch.Size([4, 1])
    >>> full = HSTU(FeatureLayout.example(), concat_ux=True, encoders="mlp", context_tokens="per_feature",
    ...             time_embeddings=True, aux_responses=True).train()
    >>> out = full(Batch.example(full.layout, batch_size=4, hist_len=8))
    >>> out.logits.shape, sorted(out.aux_losses)
    (torch.Size([4, 1]), ['aux_rating'])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sampletok.errors import ConfigError
from sampletok.features import Batch, FeatureLayout
from sampletok.models.base import ModelOutput, RankingModel, register
from sampletok.nn import MLP, FeatureEmbedding, ResponseEncoder, ResponseHeads, SwishLayerNorm, aux_losses
from sampletok.search_space import TRAIN_SPACE, Space, choice, integer, uniform


class RelativeTimePositionBias(nn.Module):
    """rab[i, j] = w_t[bucket(|t_i − t_j| seconds)] + w_p[i − j]; buckets are log base 2 of the gap."""

    def __init__(self, max_len: int, time_buckets: int = 64):
        super().__init__()
        self.time_buckets, self.max_len = time_buckets, max_len
        self.time_w = nn.Parameter(torch.zeros(time_buckets + 1))
        self.pos_w = nn.Parameter(torch.zeros(2 * max_len - 1))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [B, N] seconds (any origin) → [B, N, N]."""
        n = t.shape[1]
        dt = (t.unsqueeze(2) - t.unsqueeze(1)).abs()
        bucket = torch.log2(dt.clamp(min=1.0)).long().clamp(max=self.time_buckets)
        pos = torch.arange(n, device=t.device)
        rel = (pos.unsqueeze(1) - pos.unsqueeze(0)).clamp(-self.max_len + 1, self.max_len - 1) + self.max_len - 1
        return self.time_w[bucket] + self.pos_w[rel].unsqueeze(0)


class TimestampBucketEmbedding(nn.Module):
    """DLRM-v3's timestamp encoding (generative-recommenders ``ops/pytorch/pt_position.py``,
    ``pytorch_add_timestamp_positional_embeddings`` with ``time_bucket_fn="log"``): a token whose time gap to
    the request is ``gap`` seconds gets row ``clamp(int(ln(max(gap, 1e-6) / 60)), 0, buckets)`` of a learned
    table; a padded position gets zeros."""

    def __init__(self, dim: int, buckets: int = 32):
        super().__init__()
        self.buckets = buckets
        bound = math.sqrt(1.0 / buckets)
        self.table = nn.Parameter(torch.empty(buckets + 1, dim).uniform_(-bound, bound))

    def bucket(self, gap: torch.Tensor) -> torch.Tensor:
        """[...] seconds → [...] int64 bucket ids in [0, buckets]."""
        return torch.log(gap.float().clamp(min=1e-6) / 60.0).clamp(min=0).long().clamp(max=self.buckets)

    def forward(self, gap: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """gap [B, N] seconds, valid [B, N] bool → [B, N, dim]."""
        return self.table[self.bucket(gap)] * valid.unsqueeze(-1).to(self.table.dtype)


def _encoder(in_dim: int, width: int, kind: str, hidden: int) -> nn.Module:
    """``linear``: one Linear; ``mlp``: Linear → SwishLayerNorm → Linear → LayerNorm (DLRM-v3's encoders)."""
    if kind == "linear":
        return nn.Linear(in_dim, width)
    return nn.Sequential(
        nn.Linear(in_dim, hidden), SwishLayerNorm(hidden), nn.Linear(hidden, width), nn.LayerNorm(width)
    )


class STULayer(nn.Module):
    """One HSTU layer (sequential transduction unit), residual."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, concat_ux: bool = False):
        super().__init__()
        if heads < 1 or width % heads:
            raise ConfigError(f"HSTU width {width} is not divisible by heads {heads}")
        self.heads, self.dropout, self.concat_ux = heads, dropout, concat_ux
        self.norm_in, self.norm_attn = nn.LayerNorm(width), nn.LayerNorm(width)
        self.uvqk = nn.Linear(width, 4 * width)
        # concat_ux: the projection reads [u, attn, u ⊙ LN(attn)] (DLRM-v3's STULayer, concat_u and concat_x)
        self.out = nn.Linear(3 * width if concat_ux else width, width)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor, n_valid: torch.Tensor
    ) -> torch.Tensor:
        """x [B, N, d], bias [B, N, N] (None: none), mask [B, N, N] bool (True = may attend), n_valid [B] →
        [B, N, d]."""
        b, n, d = x.shape
        h, dh = self.heads, d // self.heads
        u, v, q, k = F.silu(self.uvqk(self.norm_in(x))).split(d, dim=-1)
        q, k, v = (z.view(b, n, h, dh).transpose(1, 2) for z in (q, k, v))
        scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(dh)
        if bias is not None:
            scores = scores + bias.unsqueeze(1)
        attn = F.silu(scores) * mask.unsqueeze(1).to(x.dtype) / n_valid.view(b, 1, 1, 1).to(x.dtype)
        y = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, d)
        gated = self.norm_attn(y) * u
        if self.concat_ux:
            gated = torch.cat([u, y, gated], dim=-1)
        y = self.out(F.dropout(gated, self.dropout, self.training))
        return x + y


@register("hstu")
class HSTU(RankingModel):
    context_index: torch.Tensor  # [K] positions of the contextual fields (context_tokens="per_feature")
    # searched by `sampletok tune` (sampletok.train.tune): keys are this model's params or training settings
    search_space: ClassVar[dict[str, Space]] = {
        **TRAIN_SPACE,
        "embed_dim": choice(8, 16, 32),
        "width": choice(16, 32, 64),
        "layers": integer(1, 4),
        "dropout": uniform(0.0, 0.5),
        "concat_ux": choice(False, True),
        "encoders": choice("linear", "mlp"),
        "context_tokens": choice("one", "per_feature"),
        "time_embeddings": choice(False, True),
    }

    def __init__(
        self,
        layout: FeatureLayout,
        embed_dim: int = 16,
        width: int = 32,
        layers: int = 2,
        heads: int = 2,
        hidden: Sequence[int] = (64,),
        dropout: float = 0.1,
        history_responses: bool | list[str] = True,
        response_dropout: float = 0.0,
        max_len: int = 1024,
        concat_ux: bool = False,
        encoders: Literal["linear", "mlp"] = "linear",
        encoder_hidden: int = 64,
        context_tokens: Literal["one", "per_feature"] = "one",
        time_embeddings: bool = False,
        relative_bias: bool = True,
        aux_responses: bool | list[str] = False,
        aux_weight: float = 0.2,
        aux_hidden: int = 64,
    ):
        """Build the model; every argument but ``layout`` is a key of its ``params`` in an experiment.

        Args:
            layout: the batch's column order and vocabulary sizes (:class:`~sampletok.features.FeatureLayout`).
            embed_dim: width of each field embedding (a field's ``embed_dim`` in the schema overrides it).
            width: token width of the STU stack.
            layers: STU layers.
            heads: attention heads.
            hidden: MLP widths of the prediction head.
            dropout: dropout rate of the MLP.
            history_responses: the action encoding reads the known responses: True all, a list the named.
            response_dropout: probability of hiding a history row's responses while training.
            max_len: the longest history the relative position bias covers.
            concat_ux: each layer projects ``[u, attn, u ⊙ LN(attn)]`` (DLRM-v3: on; default off).
            encoders: ``linear`` (default) or ``mlp``: content/action encoders Linear → SwishLayerNorm → Linear →
                LayerNorm and a SwishLayerNorm head (DLRM-v3: mlp).
            encoder_hidden: hidden width of the ``mlp`` encoders (DLRM-v3: 256).
            context_tokens: ``one`` (default: one token from every field) or ``per_feature`` (one token per
                contextual feature, DLRM-v3's).
            time_embeddings: add log-bucketed time-gap embeddings to the event and candidate tokens (DLRM-v3: on;
                default off).
            relative_bias: add the relative attention bias of time gaps and positions to every layer's scores
                (default on, as DLRM-v3; off: the layers see time gaps only through ``time_embeddings``, and order
                only through the causal mask).
            aux_responses: multitask heads predicting the request's responses (True: every non-task-label one,
                a list the named; False: none, the default). DLRM-v3 trains every action type this way.
            aux_weight: scale of each auxiliary loss (DLRM-v3's causal_multitask_weights: 0.2).
            aux_hidden: hidden width of the response heads (DLRM-v3: 512).
        """
        super().__init__(layout)
        if encoders not in ("linear", "mlp"):
            raise ConfigError(f"HSTU encoders must be 'linear' or 'mlp', got '{encoders}'")
        if context_tokens not in ("one", "per_feature"):
            raise ConfigError(f"HSTU context_tokens must be 'one' or 'per_feature', got '{context_tokens}'")
        self.embed = FeatureEmbedding(layout, embed_dim)
        self.content = _encoder(self.embed.seq_dim, width, encoders, encoder_hidden)
        if encoders == "mlp":  # the response encoder is the first linear layer of the action MLP
            self.action = ResponseEncoder(layout, encoder_hidden, history_responses, response_dropout)
            self.action_mlp: nn.Module | None = nn.Sequential(
                SwishLayerNorm(encoder_hidden), nn.Linear(encoder_hidden, width), nn.LayerNorm(width)
            )
        else:
            self.action = ResponseEncoder(layout, width, history_responses, response_dropout)
            self.action_mlp = None
        self.candidate_action = nn.Parameter(torch.zeros(width))
        self.context_mode = context_tokens
        if context_tokens == "one":
            self.context = nn.Linear(self.embed.n_tokens * embed_dim, width)
            n_context = 1
        else:  # one token per contextual field, each its own linear map (DLRM-v3's batched contextual weights)
            sequence = set(layout.seq_cat) | set(layout.seq_multi)
            index = [
                i for i, f in enumerate(layout.field_names) if layout.groups.get(f) != "item" and f not in sequence
            ]
            self.register_buffer("context_index", torch.tensor(index, dtype=torch.int64), persistent=False)
            std = math.sqrt(2.0 / (embed_dim + width))
            self.context_weight = nn.Parameter(torch.randn(len(index), embed_dim, width) * std)
            self.context_bias = nn.Parameter(torch.zeros(len(index), width))
            n_context = len(index)
        self.n_context = n_context
        self.time = TimestampBucketEmbedding(width) if time_embeddings else None
        self.bias = RelativeTimePositionBias(max_len + 1 + n_context) if relative_bias else None
        self.layers = nn.ModuleList(STULayer(width, heads, dropout, concat_ux) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        activation = SwishLayerNorm if encoders == "mlp" else nn.ReLU
        head_in = width + self.embed.n_tokens * embed_dim
        self.head = MLP(head_in, list(hidden), out_dim=self.n_tasks, dropout=dropout, activation=activation)
        self.aux = ResponseHeads(layout, width, aux_responses, aux_hidden, aux_weight) if aux_responses else None

    def context_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Field tokens [B, F, e] → the contextual tokens [B, K, width] prepended to the sequence."""
        if self.context_mode == "one":
            return self.context(tokens.flatten(1)).unsqueeze(1)
        picked = tokens[:, self.context_index]  # [B, K, e]
        return torch.einsum("bke,ked->bkd", picked, self.context_weight) + self.context_bias

    def forward(self, batch: Batch) -> ModelOutput:
        tokens = self.embed(batch)  # [B, F, e]
        fields = tokens.flatten(1)  # [B, F*e]
        hist_mask = batch.hist_mask
        b, n = hist_mask.shape
        k = self.n_context
        action = self.action(batch.hist_responses, batch.hist_response_mask)
        if self.action_mlp is not None:
            action = self.action_mlp(action)
        events = (self.content(self.embed.history(batch)) + action) * hist_mask.unsqueeze(-1)
        item = self.content(self.embed.target_item(batch))  # [B, d] the candidate's content embedding
        candidate = item + self.candidate_action
        if self.time is not None:  # DLRM-v3's timestamp embeddings: events at their gaps, the candidate at 0
            events = events + self.time(batch.hist_gap, hist_mask)
            candidate = candidate + self.time(batch.hist_gap.new_zeros(b), hist_mask.new_ones(b))
        x = torch.cat([self.context_tokens(tokens), events, candidate.unsqueeze(1)], dim=1)  # [B, k+n+1, d]
        # token times in seconds before the request: context and candidate at the request, events at their gaps
        t = -torch.cat([batch.hist_gap.new_zeros(b, k), batch.hist_gap, batch.hist_gap.new_zeros(b, 1)], dim=1)
        valid = torch.cat([hist_mask.new_ones(b, k), hist_mask, hist_mask.new_ones(b, 1)], dim=1)
        causal = torch.ones(n + k + 1, n + k + 1, dtype=torch.bool, device=x.device).tril()
        mask = causal.unsqueeze(0) & valid.unsqueeze(1) & valid.unsqueeze(2)
        n_valid = valid.sum(1)
        bias = self.bias(t) if self.bias is not None else None  # off: no [B, N, N] of zeros either
        for layer in self.layers:
            x = layer(x, bias, mask, n_valid)
        user = self.norm(x[:, -1])
        logits = self.head(torch.cat([user, fields], dim=1))
        # DLRM-v3's multitask module predicts from user ⊙ item
        return ModelOutput(logits, aux_losses(self.aux, user * item, batch, self.training))
