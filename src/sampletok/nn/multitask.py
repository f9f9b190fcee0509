"""Auxiliary response heads: the multitask option every ranking model that has a shared representation gets
(DIN, HSTU), as DLRM-v3's multitask module (meta-recsys/generative-recommenders
``modules/multitask_module.py``): one prediction module ``Linear → SwishLayerNorm → Linear`` over the
representation predicts each named response of the request, a binary one with a logit (BCE), a numeric one
with a value (MSE: DLRM-v3's watch-time regression), a categorical one with a logit per code (cross-entropy,
code 0 = padding ignored), and the losses, a masked mean over the rows that have the outcome each, enter the
training loss as ``ModelOutput.aux_losses`` scaled by ``weight`` (DLRM-v3's ``causal_multitask_weights``, 0.2).

The targets are the request rows' own outcomes (``Batch.responses``, filled by the offline loader): never an
input. The heads add losses only while training on such a batch; serving batches have no responses.

Example:
    >>> from sampletok.features import Batch, FeatureLayout
    >>> lay = FeatureLayout.example()
    >>> heads = ResponseHeads(lay, in_dim=8)
    >>> heads.names, heads.kinds
    (['rating'], ['categorical'])
    >>> sorted(heads.losses(torch.randn(4, 8), Batch.example(lay, batch_size=4)))
    ['aux_rating']
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sampletok.errors import ConfigError
from sampletok.features import Batch, FeatureLayout
from sampletok.nn.layers import SwishLayerNorm


def response_kind(layout: FeatureLayout, name: str) -> str:
    """``categorical`` (a vocabulary: categorical or bucketized), ``binary`` or ``numeric`` (a value)."""
    if layout.response_vocab_sizes.get(name):
        return "categorical"
    kind = layout.response_types.get(name, "binary" if name in layout.task_labels else "numeric")
    return "numeric" if kind == "numeric" else "binary"


class ResponseHeads(nn.Module):
    """Predicts the request's responses from a representation [B, in_dim].

    Args:
        layout: names the responses and their types and vocabularies.
        in_dim: width of the representation.
        names: True every response that is not a task label (the main loss trains those), or a list of names
            (a task label may be named: it then gets a head of its own too).
        hidden: width of the prediction module's hidden layer (DLRM-v3: 512).
        weight: scale of every auxiliary loss (DLRM-v3's ``causal_multitask_weights``: 0.2).
    """

    def __init__(
        self, layout: FeatureLayout, in_dim: int, names: bool | list[str] = True, hidden: int = 64, weight: float = 0.2
    ):
        super().__init__()
        if names is True:
            names = [r for r in layout.responses if r not in layout.task_labels]
            if not names:
                raise ConfigError("aux_responses: the schema has no response beyond the task labels to predict")
        names = list(names or [])
        unknown = sorted(set(names) - set(layout.responses))
        if unknown:
            raise ConfigError(f"aux_responses {unknown} are not in the schema (it has {layout.responses})")
        if not names:
            raise ConfigError("aux_responses: name at least one response")
        if weight < 0:
            raise ConfigError(f"aux_weight must be >= 0, got {weight}")
        self.names, self.weight = names, weight
        self.kinds = [response_kind(layout, r) for r in names]
        self._index = [layout.responses.index(r) for r in names]
        widths = [
            layout.response_vocab_sizes[r] if k == "categorical" else 1 for r, k in zip(names, self.kinds, strict=True)
        ]
        self._slices = [(sum(widths[:i]), sum(widths[: i + 1])) for i in range(len(widths))]
        self.predict = nn.Sequential(nn.Linear(in_dim, hidden), SwishLayerNorm(hidden), nn.Linear(hidden, sum(widths)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[B, in_dim] → [B, Σ widths]: each response's logit(s) or value, in ``names`` order."""
        return self.predict(h)

    def losses(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"aux_<name>": weight · loss}`` against the batch's own responses; empty without them."""
        if batch.responses is None:
            return {}
        out = self(h).float()
        mask = batch.response_mask
        losses: dict[str, torch.Tensor] = {}
        for name, kind, i, (a, b) in zip(self.names, self.kinds, self._index, self._slices, strict=True):
            target = batch.responses[:, i].float()
            valid = torch.ones_like(target) if mask is None else mask[:, i].to(target.dtype)
            if kind == "categorical":
                code = target.long()
                valid = valid * (code > 0).to(valid.dtype)  # code 0: padding, no outcome
                per_row = F.cross_entropy(out[:, a:b], code, reduction="none")
            elif kind == "binary":
                per_row = F.binary_cross_entropy_with_logits(out[:, a], target, reduction="none")
            else:
                per_row = F.mse_loss(out[:, a], target, reduction="none")
            losses[f"aux_{name}"] = self.weight * (per_row * valid).sum() / valid.sum().clamp(min=1.0)
        return losses


def aux_losses(heads: ResponseHeads | None, h: torch.Tensor, batch: Batch, training: bool) -> dict[str, torch.Tensor]:
    """The auxiliary losses a model adds to its output: the heads' while training, none otherwise."""
    if heads is None or not training:
        return {}
    return heads.losses(h, batch)
