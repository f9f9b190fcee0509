"""DNN: every field embedding plus the mean of the history item embeddings → MLP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from sampletok.features import Batch, FeatureLayout
from sampletok.models.base import ModelOutput, RankingModel, register
from sampletok.nn import MLP, FeatureEmbedding
from sampletok.nn.layers import masked_mean
from sampletok.search_space import TRAIN_SPACE, Space, choice, uniform


@register("dnn")
class DNN(RankingModel):
    # searched by `sampletok tune` (sampletok.train.tune): keys are this model's params or training settings
    search_space: ClassVar[dict[str, Space]] = {
        **TRAIN_SPACE,
        "embed_dim": choice(8, 16, 32),
        "hidden": choice([256, 128, 64], [128, 64], [64]),
        "dropout": uniform(0.0, 0.5),
    }

    def __init__(
        self,
        layout: FeatureLayout,
        embed_dim: int = 16,
        hidden: Sequence[int] = (256, 128, 64),
        dropout: float = 0.1,
        use_history: bool = True,
    ):
        """Build the model; every argument but ``layout`` is a key of its ``params`` in an experiment.

        Args:
            layout: the batch's column order and vocabulary sizes (:class:`~sampletok.features.FeatureLayout`).
            embed_dim: width of each field embedding (a field's ``embed_dim`` in the schema overrides it).
            hidden: MLP widths of the prediction head.
            dropout: dropout rate of the MLP.
            use_history: add the mean of the history item embeddings (ignored without a sequence).
        """
        super().__init__(layout)
        self.embed = FeatureEmbedding(layout, embed_dim)
        self.use_history = use_history and bool(layout.seq_cat or layout.seq_multi)
        in_dim = self.embed.n_tokens * embed_dim + (self.embed.seq_dim if self.use_history else 0)
        self.mlp = MLP(in_dim, list(hidden), out_dim=self.n_tasks, dropout=dropout)

    def forward(self, batch: Batch) -> ModelOutput:
        x = self.embed(batch).flatten(1)
        if self.use_history:
            x = torch.cat([x, masked_mean(self.embed.history(batch), batch.hist_mask)], dim=1)
        return ModelOutput(self.mlp(x))
