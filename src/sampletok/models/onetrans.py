"""OneTrans-style unified Transformer (Zhang et al., 2025): history items (sequential tokens) and every
non-sequential field (one token each) in one stack. Sequential tokens attend causally among themselves;
non-sequential tokens attend to all valid history and to each other. Output: mean of non-sequential tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from sampletok.features import Batch, FeatureLayout
from sampletok.models.base import ModelOutput, RankingModel, register
from sampletok.nn import MLP, FeatureEmbedding, TransformerBlock
from sampletok.nn.layers import RecencyEncoding
from sampletok.search_space import TRAIN_SPACE, Space, choice, integer, uniform


@register("onetrans")
class OneTrans(RankingModel):
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
    ):
        """Build the model; every argument but ``layout`` is a key of its ``params`` in an experiment.

        Args:
            layout: the batch's column order and vocabulary sizes (:class:`~sampletok.features.FeatureLayout`).
            embed_dim: width of each field embedding (a field's ``embed_dim`` in the schema overrides it).
            width: token width of the unified stack.
            layers: Transformer layers.
            heads: attention heads.
            hidden: MLP widths of the prediction head.
            dropout: dropout rate of the MLP.
        """
        super().__init__(layout)
        self.embed = FeatureEmbedding(layout, embed_dim)
        f = self.embed.n_tokens
        # per-field projections (non-shared, as OneTrans' NS tokenizer), as one batched weight
        self.ns_proj = nn.Parameter(torch.randn(f, embed_dim, width) / embed_dim**0.5)
        self.ns_bias = nn.Parameter(torch.zeros(f, width))
        self.seq_proj = nn.Linear(self.embed.seq_dim, width)
        self.recency = RecencyEncoding(width)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(layers))
        self.head = MLP(width, list(hidden), out_dim=self.n_tasks, dropout=dropout)

    def forward(self, batch: Batch) -> ModelOutput:
        ns = torch.einsum("bfd,fdw->bfw", self.embed(batch), self.ns_proj) + self.ns_bias
        s = self.seq_proj(self.embed.history(batch)) + self.recency(batch.hist_gap, batch.hist_mask)
        x = torch.cat([s, ns], dim=1)
        n, f = s.shape[1], ns.shape[1]
        valid = torch.cat([batch.hist_mask, batch.hist_mask.new_ones(len(batch), f)], dim=1)  # [B, n+f]
        causal = torch.ones(n + f, n + f, dtype=torch.bool, device=x.device).tril()
        causal[n:, :] = True  # non-sequential tokens see everything
        mask = causal.unsqueeze(0) & valid.unsqueeze(1)
        mask = mask | torch.eye(n + f, dtype=torch.bool, device=x.device)  # never an empty row
        for block in self.blocks[:-1]:
            x = block(x, mask)
        # pyramid: the last block computes only the non-sequential rows that feed the head
        ns_out = self.blocks[-1](x[:, n:], mask[:, n:], context=x)
        return ModelOutput(self.head(ns_out.mean(1)))
