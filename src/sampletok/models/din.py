"""DIN (Zhou et al., 2018): target attention of the candidate item over the history (item id + side fields)."""
from __future__ import annotations

import torch

from sampletok.data.batches import Batch, FeatureLayout
from sampletok.models.base import ModelOutput, RankingModel, register
from sampletok.nn import MLP, FeatureEmbedding, TargetAttention


@register("din")
class DIN(RankingModel):
    def __init__(self, layout: FeatureLayout, embed_dim: int = 16, hidden: list[int] = (256, 128, 64),
                 attention_hidden: list[int] = (64, 32), dropout: float = 0.1, extra_dim: int = 0):
        super().__init__(layout)
        self.embed = FeatureEmbedding(layout, embed_dim)
        self.attention = TargetAttention(self.embed.seq_dim, list(attention_hidden))
        in_dim = self.embed.n_tokens * embed_dim + self.embed.seq_dim + extra_dim  # extra: e.g. an IAT token
        self.mlp = MLP(in_dim, list(hidden), out_dim=self.n_tasks, dropout=dropout)

    def interest(self, batch: Batch) -> torch.Tensor:
        """[B, seq_dim] attention-pooled history."""
        return self.attention(self.embed.target_item(batch), self.embed.history(batch), batch.hist_mask)

    def feature_input(self, batch: Batch) -> torch.Tensor:
        """The vector the interaction MLP reads."""
        return torch.cat([self.embed(batch).flatten(1), self.interest(batch)], dim=1)

    def predict_from(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)

    def forward(self, batch: Batch) -> ModelOutput:
        return ModelOutput(self.predict_from(self.feature_input(batch)))
