"""What every ranking model shares: the output contract and the registry."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from sampletok.errors import ConfigError, one_line, validation_message
from sampletok.features import Batch, FeatureLayout, TokenInput
from sampletok.search_space import TRAIN_SPACE, Space


@dataclass
class ModelOutput:
    """``logits`` [B, Y] for the task labels; ``aux_losses`` are added to the loss by name (already weighted)."""

    logits: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class RankingModel(nn.Module):
    """Base class: ``forward(batch) -> ModelOutput``. Subclasses are registered by name."""

    name: str = ""
    calibration: torch.Tensor  # [2] buffer (a, b), see __init__
    # what `sampletok tune` searches (sampletok.train.tune): {param or training setting: Space}; every model
    # declares its own beside its parameters (a test checks each key against the model's config)
    search_space: ClassVar[dict[str, Space]] = TRAIN_SPACE

    def __init__(self, layout: FeatureLayout):
        super().__init__()
        self.layout = layout
        self.n_tasks = len(layout.task_labels)
        # score = sigmoid(a * logit + b) at prediction time: Platt scaling fitted on the validation split
        # (identity unless ``TrainConfig.calibrate``); monotone, so AUC and GAUC are unchanged
        self.register_buffer("calibration", torch.tensor([1.0, 0.0]))

    def calibrated(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities sigmoid(a · logit + b) of float64 first-task logits (float64: float32 rounds every
        logit above ~17 to 1.0, which ties confident scores)."""
        a, b = (float(v) for v in self.calibration)
        return 1.0 / (1.0 + np.exp(-(a * logits + b)))

    def forward(self, batch: Batch) -> ModelOutput:  # pragma: no cover - abstract
        """Score a batch; every model has this one signature and reads nothing but the batch's tensors.

        Args:
            batch: B requests (shapes in :class:`~sampletok.features.Batch`; ``Batch.example(layout)`` builds
                one from random codes).

        Returns:
            :class:`ModelOutput`: ``logits`` [B, Y], one per task label, and ``aux_losses`` (scalar tensors).
        """
        raise NotImplementedError

    @property
    def reads_history_samples(self) -> bool:
        """Whether the model reads whole past samples (``Batch.history_samples``); the loader gathers them."""
        return False

    @property
    def token_input(self) -> TokenInput | None:
        """The tokens the model reads from a token store (``Batch.tokens``), or None: the data stage fetches
        them through the token method of their kind (:mod:`sampletok.tokens`)."""
        return None


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
    params = _checked_params(name, cls, params)
    from pydantic import ValidationError

    try:
        return cls(layout, **params)
    except ConfigError as e:
        raise ConfigError(f"model '{name}': {e}") from None
    except ValidationError as e:  # a nested config (e.g. IAT's source) the constructor validates
        raise ConfigError(f"model '{name}': {e.title}: {validation_message(e)}") from None
    except (ValueError, TypeError, AssertionError, ZeroDivisionError, RuntimeError) as e:
        raise ConfigError(f"model '{name}' cannot be built with parameters {params}: {one_line(e)}") from None


def model_config(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The model's full config: every constructor argument, given or default, as JSON (a sub-config such as
    IAT's ``source`` or SIF's ``hgaq`` with all its fields). ``model.pt`` stores it beside the weights and
    :func:`~sampletok.train.experiment.load_trained` builds the model from it, so a later change of a default
    cannot change a saved model.

    Example:
        >>> cfg = model_config("sif", {"width": 16})
        >>> cfg["name"], cfg["params"]["width"], cfg["params"]["blocks"], cfg["params"]["hgaq"]["levels"]
        ('sif', 16, 4, 3)
    """
    import typing

    from pydantic import BaseModel, ValidationError, create_model

    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; available: {', '.join(sorted(MODELS))}")
    cls = MODELS[name]
    init = next(vars(c)["__init__"] for c in cls.__mro__ if "__init__" in vars(c))
    hints = typing.get_type_hints(init)
    sig = inspect.signature(init).parameters
    unknown = sorted(set(params) - set(sig) - {"self", "layout"})
    if unknown:
        raise ConfigError(f"model '{name}' has no parameter(s) {unknown}")
    fields: dict[str, Any] = {k: (hints.get(k, Any), p.default) for k, p in sig.items() if k not in ("self", "layout")}
    try:
        checked = create_model(f"{name} config", __config__={"protected_namespaces": ()}, **fields)(**params)
    except ValidationError as e:
        raise ConfigError(f"model '{name}': {validation_message(e)}") from None
    full = checked.model_dump(mode="json")
    for k in fields:  # a sub-config left at None: its defaults in full
        sub = [t for t in typing.get_args(hints.get(k)) if isinstance(t, type) and issubclass(t, BaseModel)]
        value = getattr(checked, k)
        if sub and (value is None or isinstance(value, dict)):
            full[k] = sub[0].model_validate(value or {}).model_dump(mode="json")
    return {"name": name, "params": full}


def _checked_params(name: str, cls: type, params: dict) -> dict:
    """``params`` validated (and coerced, e.g. '1e-3' to a float) against the constructor's annotations, so a
    value of the wrong type is a one-line ``model 'x': field: message``; unchanged where an annotation cannot
    be validated."""
    import typing
    import warnings

    from pydantic import ConfigDict, ValidationError, create_model

    if not params:
        return params
    try:
        init = next(vars(c)["__init__"] for c in cls.__mro__ if "__init__" in vars(c))
        hints = typing.get_type_hints(init)
        fields: dict[str, typing.Any] = {k: (hints.get(k, typing.Any), ...) for k in params}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checker = create_model(
                f"{name} parameters",
                __config__=ConfigDict(arbitrary_types_allowed=True, protected_namespaces=()),
                **fields,
            )
    except Exception:  # an annotation pydantic cannot build a validator for: the constructor checks
        return params
    try:
        checked = checker(**params)
    except ValidationError as e:
        raise ConfigError(f"model '{name}': {validation_message(e)}") from None
    return {k: getattr(checked, k) for k in params}
