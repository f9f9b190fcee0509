"""BST (Chen et al., 2019): a Transformer over the history items and the target item (with recency
encodings); the target position's output joins the field embeddings in an MLP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from sampletok.features import Batch, FeatureLayout
from sampletok.models.base import ModelOutput, RankingModel, register
from sampletok.nn import MLP, FeatureEmbedding, TransformerBlock
from sampletok.nn.layers import RecencyEncoding, key_padding_mask
from sampletok.search_space import TRAIN_SPACE, Space, choice, integer, uniform


@register("bst")
class BST(RankingModel):
    # searched by `sampletok tune` (sampletok.train.tune): keys are this model's params or training settings
    search_space: ClassVar[dict[str, Space]] = {
        **TRAIN_SPACE,
        "embed_dim": choice(8, 16, 32),
        "layers": integer(1, 3),
        "hidden": choice([256, 128, 64], [128, 64], [64]),
        "dropout": uniform(0.0, 0.5),
    }

    def __init__(
        self,
        layout: FeatureLayout,
        embed_dim: int = 16,
        layers: int = 1,
        heads: int = 2,
        hidden: Sequence[int] = (256, 128, 64),
        dropout: float = 0.1,
        extra_dim: int = 0,
    ):
        """Build the model; every argument but ``layout`` is a key of its ``params`` in an experiment.

        Args:
            layout: the batch's column order and vocabulary sizes (:class:`~sampletok.features.FeatureLayout`).
            embed_dim: width of each field embedding (a field's ``embed_dim`` in the schema overrides it).
            layers: Transformer layers over history + target.
            heads: attention heads.
            hidden: MLP widths of the prediction head.
            dropout: dropout rate of the MLP.
            extra_dim: width of an extra input vector (IAT's branch before interaction); 0 for none.
        """
        super().__init__(layout)
        self.embed = FeatureEmbedding(layout, embed_dim)
        d = self.embed.seq_dim
        self.recency = RecencyEncoding(d)
        self.target_pos = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(TransformerBlock(d, heads) for _ in range(layers))
        self.mlp = MLP(
            self.embed.n_tokens * embed_dim + d + extra_dim, list(hidden), out_dim=self.n_tasks, dropout=dropout
        )

    def forward(self, batch: Batch) -> ModelOutput:
        return ModelOutput(self.predict_from(self.feature_input(batch)))

    def predict_from(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)

    def feature_input(self, batch: Batch) -> torch.Tensor:
        """Field embeddings and the Transformer's target-position output (what the MLP reads)."""
        hist = self.embed.history(batch) + self.recency(batch.hist_gap, batch.hist_mask)
        target = (self.embed.target_item(batch) + self.target_pos).unsqueeze(1)
        seq = torch.cat([hist, target], dim=1)
        valid = torch.cat([batch.hist_mask, batch.hist_mask.new_ones(len(batch), 1)], dim=1)
        mask = key_padding_mask(valid, seq.shape[1])
        for block in self.blocks[:-1]:
            seq = block(seq, mask)
        # only the target position's output is used: the last block computes that row alone
        target_out = self.blocks[-1](seq[:, -1:], mask[:, -1:], context=seq)[:, 0]
        return torch.cat([self.embed(batch).flatten(1), target_out], dim=1)
