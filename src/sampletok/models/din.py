"""DIN (Zhou et al., 2018): target attention of the candidate item over the history (item id + side fields).

``history_responses`` adds each past interaction's already-known responses (task labels and the schema's
responses, through the shared :class:`~sampletok.nn.ResponseEncoder`) to its history embedding: the
response-aware history SIF and IAT read, given to DIN so that a comparison can tell the value of past
responses from the value of the method. ``True`` reads every response, a list the named ones;
``response_dropout`` hides a history row's responses with that probability while training.
``responses_to: user`` reads them in a separate user-level branch instead (their mean over the user's history
rows enters the MLP beside the item attention, which then reads item IDs only): past responses can then only
describe the user, not re-weight items (an ablation for the GAUC question in docs/results.md).

``aux_responses`` (off by default) adds the multitask heads of :class:`~sampletok.nn.ResponseHeads` over the
MLP's input: each named response of the request (True: every one that is not a task label) is predicted as an
auxiliary loss (weight ``aux_weight``), its target the row's own outcome, never an input.

Example:
    >>> from sampletok.features import Batch, FeatureLayout
    >>> model = DIN(FeatureLayout.example(), history_responses=True)
    >>> model(Batch.example(model.layout, batch_size=4, hist_len=8)).logits.shape
    torch.Size([4, 1])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

from sampletok.features import Batch, FeatureLayout
from sampletok.models.base import ModelOutput, RankingModel, register
from sampletok.nn import MLP, FeatureEmbedding, ResponseEncoder, ResponseHeads, TargetAttention, aux_losses
from sampletok.nn.layers import masked_mean
from sampletok.search_space import TRAIN_SPACE, Space, choice, uniform


@register("din")
class DIN(RankingModel):
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
        attention_hidden: Sequence[int] = (64, 32),
        attention_pooling: Literal["sum", "mean"] = "sum",
        dropout: float = 0.1,
        extra_dim: int = 0,
        history_responses: bool | list[str] = False,
        response_dropout: float = 0.0,
        responses_to: Literal["items", "user"] = "items",
        aux_responses: bool | list[str] = False,
        aux_weight: float = 0.2,
        aux_hidden: int = 64,
    ):
        """Build the model; every argument but ``layout`` is a key of its ``params`` in an experiment.

        Args:
            layout: the batch's column order and vocabulary sizes (:class:`~sampletok.features.FeatureLayout`).
            embed_dim: width of each field embedding (a field's ``embed_dim`` in the schema overrides it).
            hidden: MLP widths of the prediction head.
            attention_hidden: MLP widths of the target-attention unit.
            attention_pooling: ``sum`` (DIN's un-normalized weighted sum, the default) or ``mean`` (that sum over
                the request's number of history rows, so its scale does not grow with the history length).
            dropout: dropout rate of the MLP.
            extra_dim: width of an extra input vector (IAT's branch before interaction); 0 for none.
            history_responses: add each history row's responses known at the request: True all, a list the named.
            response_dropout: probability of hiding a history row's responses while training.
            responses_to: ``items`` (responses re-weight history items) or ``user`` (a separate user branch).
            aux_responses: multitask heads predicting the request's responses (True: every non-task-label one,
                a list the named; False: none, the default).
            aux_weight: scale of each auxiliary loss (DLRM-v3: 0.2).
            aux_hidden: hidden width of the response heads.
        """
        super().__init__(layout)
        self.embed = FeatureEmbedding(layout, embed_dim)
        self.responses = (
            ResponseEncoder(layout, self.embed.seq_dim, history_responses, response_dropout)
            if history_responses
            else None
        )
        self.responses_to = responses_to
        self.attention = TargetAttention(self.embed.seq_dim, list(attention_hidden), attention_pooling)
        user_dim = self.embed.seq_dim if history_responses and responses_to == "user" else 0
        in_dim = self.embed.n_tokens * embed_dim + self.embed.seq_dim + user_dim + extra_dim  # extra: e.g. IAT
        self.mlp = MLP(in_dim, list(hidden), out_dim=self.n_tasks, dropout=dropout)
        self.aux = ResponseHeads(layout, in_dim, aux_responses, aux_hidden, aux_weight) if aux_responses else None

    def interest(self, batch: Batch) -> torch.Tensor:
        """[B, seq_dim] attention-pooled history; several served requests' histories are each read once."""
        grouped = batch.grouped_history and len(batch.history_heads()) > 1
        rows = batch.history_heads() if grouped else slice(None)  # one history per group, or per row
        history = self.embed.group_history(batch) if grouped else self.embed.history(batch)
        mask = batch.hist_mask[rows]
        if self.responses is not None and self.responses_to == "items":
            past = self.responses(batch.hist_responses[rows], batch.hist_response_mask[rows])
            history = history + past * mask.unsqueeze(-1)
        target = self.embed.target_item(batch)
        if not grouped:
            return self.attention(target, history, mask)
        assert batch.history_group is not None
        return self.attention.forward_grouped(target, history, mask, batch.history_group)

    def feature_input(self, batch: Batch) -> torch.Tensor:
        """The vector the interaction MLP reads."""
        parts = [self.embed(batch).flatten(1), self.interest(batch)]
        if self.responses is not None and self.responses_to == "user":
            past = self.responses(batch.hist_responses, batch.hist_response_mask)
            parts.append(masked_mean(past, batch.hist_mask))
        return torch.cat(parts, dim=1)

    def predict_from(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)

    def forward(self, batch: Batch) -> ModelOutput:
        x = self.feature_input(batch)
        return ModelOutput(self.predict_from(x), aux_losses(self.aux, x, batch, self.training))
