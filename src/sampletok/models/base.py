"""What every ranking model shares: the output contract and the registry."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from sampletok.data.batches import Batch, FeatureLayout
from sampletok.errors import ConfigError


@dataclass
class ModelOutput:
    """``logits`` [B, Y] for the task labels; ``aux_losses`` are added to the loss by name (already weighted)."""

    logits: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class RankingModel(nn.Module):
    """Base class: ``forward(batch) -> ModelOutput``. Subclasses are registered by name."""

    name: str = ""

    def __init__(self, layout: FeatureLayout):
        super().__init__()
        self.layout = layout
        self.n_tasks = len(layout.task_labels)

    def forward(self, batch: Batch) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare_data(self, ds, *, seed: int, run_dir=None, progress: bool = True) -> None:
        """Hook for models that need more than the batch (e.g. a token store built by a source model)."""


MODELS: dict[str, type[RankingModel]] = {}


def register(name: str) -> Callable[[type[RankingModel]], type[RankingModel]]:
    def deco(cls: type[RankingModel]) -> type[RankingModel]:
        cls.name = name
        MODELS[name] = cls
        return cls

    return deco


def build_model(name: str, layout: FeatureLayout, **params) -> RankingModel:
    """The model registered under ``name``; unknown names or parameters are a one-line error."""
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; available: {', '.join(sorted(MODELS))}")
    cls = MODELS[name]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "layout"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"model '{name}' has no parameter(s) {unknown}; it takes {sorted(allowed)}")
    return cls(layout, **params)
