"""HSTU-style ranker (Zhai et al., 2024, "Actions Speak Louder than Words"), as in the DLRM-v3 ranking model of
meta-recsys/generative-recommenders: the user's history is a sequence of events, each token the sum of the
item's **content** embedding and an **action** encoding of the event's responses (only those known at the
request, through the shared :class:`~sampletok.nn.ResponseEncoder`); a contextual token (the request's
non-item fields) is prepended and the candidate (content + a learned "to be predicted" action) appended.

STU layers (pointwise-SiLU attention instead of softmax, normalized by the sequence length, gated by ``U``):

    U, V, Q, K = split(SiLU(W₁ · LN(X)))
    A = SiLU(Q Kᵀ / √d_h + rab(Δt, Δpos)) / n ⊙ mask
    X ← X + W₂ · (LN(A V) ⊙ U)

with a relative attention bias from log-bucketed time gaps and relative positions (one learned scalar per
bucket, as generative-recommenders' ``RelativeBucketedTimeAndPositionBasedBias``). History tokens attend
causally (to earlier events and the context), the candidate to every event: it never sees itself as history.
The head reads the candidate's output and the request's field embeddings.

Example:
    >>> from sampletok.features import Batch, FeatureLayout
    >>> model = HSTU(FeatureLayout.example())
    >>> model(Batch.example(model.layout, batch_size=4, hist_len=8)).logits.shape
    torch.Size([4, 1])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sampletok.errors import ConfigError
from sampletok.features import Batch, FeatureLayout
from sampletok.models.base import ModelOutput, RankingModel, register
from sampletok.nn import MLP, FeatureEmbedding, ResponseEncoder
from sampletok.train.tune import TRAIN_SPACE, Space, choice, integer, uniform


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


class STULayer(nn.Module):
    """One HSTU layer (sequential transduction unit), residual."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if heads < 1 or width % heads:
            raise ConfigError(f"HSTU width {width} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.norm_in, self.norm_attn = nn.LayerNorm(width), nn.LayerNorm(width)
        self.uvqk = nn.Linear(width, 4 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        """x [B, N, d], bias [B, N, N], mask [B, N, N] bool (True = may attend), n_valid [B] → [B, N, d]."""
        b, n, d = x.shape
        h, dh = self.heads, d // self.heads
        u, v, q, k = F.silu(self.uvqk(self.norm_in(x))).split(d, dim=-1)
        q, k, v = (z.view(b, n, h, dh).transpose(1, 2) for z in (q, k, v))
        scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(dh) + bias.unsqueeze(1)
        attn = F.silu(scores) * mask.unsqueeze(1).to(x.dtype) / n_valid.view(b, 1, 1, 1).to(x.dtype)
        y = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, d)
        y = self.out(F.dropout(self.norm_attn(y) * u, self.dropout, self.training))
        return x + y


@register("hstu")
class HSTU(RankingModel):
    # searched by `sampletok tune` (sampletok.train.tune): keys are this model's params or training settings
    search_space: ClassVar[dict[str, Space]] = {
        **TRAIN_SPACE,
        "embed_dim": choice(8, 16, 32),
        "width": choice(16, 32, 64),
        "layers": integer(1, 4),
        "dropout": uniform(0.0, 0.5),
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
        """
        super().__init__(layout)
        self.embed = FeatureEmbedding(layout, embed_dim)
        self.content = nn.Linear(self.embed.seq_dim, width)
        self.action = ResponseEncoder(layout, width, history_responses, response_dropout)
        self.candidate_action = nn.Parameter(torch.zeros(width))
        self.context = nn.Linear(self.embed.n_tokens * embed_dim, width)
        self.bias = RelativeTimePositionBias(max_len + 2)
        self.layers = nn.ModuleList(STULayer(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = MLP(width + self.embed.n_tokens * embed_dim, list(hidden), out_dim=self.n_tasks, dropout=dropout)

    def forward(self, batch: Batch) -> ModelOutput:
        fields = self.embed(batch).flatten(1)  # [B, F*e]
        hist_mask = batch.hist_mask
        b, n = hist_mask.shape
        events = self.content(self.embed.history(batch)) + self.action(batch.hist_responses, batch.hist_response_mask)
        events = events * hist_mask.unsqueeze(-1)
        candidate = self.content(self.embed.target_item(batch)) + self.candidate_action
        x = torch.cat([self.context(fields).unsqueeze(1), events, candidate.unsqueeze(1)], dim=1)  # [B, n+2, d]
        # token times in seconds before the request: context and candidate at the request, events at their gaps
        zero = batch.hist_gap.new_zeros(b, 1)
        t = -torch.cat([zero, batch.hist_gap, zero], dim=1)
        valid = torch.cat([hist_mask.new_ones(b, 1), hist_mask, hist_mask.new_ones(b, 1)], dim=1)
        causal = torch.ones(n + 2, n + 2, dtype=torch.bool, device=x.device).tril()
        mask = causal.unsqueeze(0) & valid.unsqueeze(1) & valid.unsqueeze(2)
        n_valid = valid.sum(1)
        bias = self.bias(t)
        for layer in self.layers:
            x = layer(x, bias, mask, n_valid)
        return ModelOutput(self.head(torch.cat([self.norm(x[:, -1]), fields], dim=1)))
