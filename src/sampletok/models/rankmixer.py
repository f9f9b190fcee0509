"""RankMixer (Zhu et al., 2025): feature tokens (fields + a target-attended history token) are projected into
T tokens of width D and mixed by parameter-free token mixing and per-token FFNs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from sampletok.features import Batch, FeatureLayout
from sampletok.models.base import ModelOutput, RankingModel, register
from sampletok.nn import MLP, FeatureEmbedding, RankMixerBlock, TargetAttention
from sampletok.search_space import TRAIN_SPACE, Space, choice, integer, uniform


@register("rankmixer")
class RankMixer(RankingModel):
    # searched by `sampletok tune` (sampletok.train.tune): keys are this model's params or training settings
    search_space: ClassVar[dict[str, Space]] = {
        **TRAIN_SPACE,
        "embed_dim": choice(8, 16, 32),
        "width": choice(32, 64, 128),
        "layers": integer(1, 4),
        "dropout": uniform(0.0, 0.5),
    }

    def __init__(
        self,
        layout: FeatureLayout,
        embed_dim: int = 16,
        tokens: int = 8,
        width: int = 64,
        layers: int = 2,
        hidden: Sequence[int] = (64,),
        dropout: float = 0.1,
        extra_dim: int = 0,
    ):
        """Build the model; every argument but ``layout`` is a key of its ``params`` in an experiment.

        Args:
            layout: the batch's column order and vocabulary sizes (:class:`~sampletok.features.FeatureLayout`).
            embed_dim: width of each field embedding (a field's ``embed_dim`` in the schema overrides it).
            tokens: feature tokens T the input is projected into.
            width: width D of each token.
            layers: RankMixer blocks (token mixing + per-token FFN).
            hidden: MLP widths of the prediction head.
            dropout: dropout rate of the MLP.
            extra_dim: width of an extra input vector (IAT's branch before interaction); 0 for none.
        """
        super().__init__(layout)
        self.embed = FeatureEmbedding(layout, embed_dim)
        self.attention = TargetAttention(self.embed.seq_dim)
        in_dim = self.embed.n_tokens * embed_dim + self.embed.seq_dim + extra_dim
        self.tokens, self.width = tokens, width
        self.tokenize = nn.Linear(in_dim, tokens * width)
        self.blocks = nn.ModuleList(RankMixerBlock(tokens, width, dropout=dropout) for _ in range(layers))
        self.head = MLP(width, list(hidden), out_dim=self.n_tasks, dropout=dropout)

    def feature_input(self, batch: Batch) -> torch.Tensor:
        interest = self.attention(self.embed.target_item(batch), self.embed.history(batch), batch.hist_mask)
        return torch.cat([self.embed(batch).flatten(1), interest], dim=1)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] tokens → mixed [B, T, D]."""
        for block in self.blocks:
            x = block(x)
        return x

    def predict_from(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokenize(x).view(len(x), self.tokens, self.width)
        return self.head(self.mix(tokens).mean(1))

    def forward(self, batch: Batch) -> ModelOutput:
        return ModelOutput(self.predict_from(self.feature_input(batch)))
