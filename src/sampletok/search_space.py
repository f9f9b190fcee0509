"""The description of a hyper-parameter search space, which every model declares beside its parameters
(``search_space``) and ``sampletok tune`` (:mod:`sampletok.train.tune`) searches: a mapping ``key -> Space``
(float, int or categorical), validated once (a bad space is a one-line ConfigError).

Example:
    >>> space = {"lr": log_uniform(1e-4, 1e-2), "dropout": uniform(0.0, 0.5), "blocks": integer(1, 4)}
    >>> space["lr"].kind, space["blocks"].high
    ('float', 4)
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from sampletok.errors import ConfigError


# ------------------------------------------------------------------ the description of a space
class FloatSpace(BaseModel):
    """A float in [low, high]; ``log``: sampled log-uniformly (low > 0)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatSpace:
        _check_bounds(self.low, self.high, self.log)
        return self

    def corners(self) -> list[Any]:
        return [self.low, self.high]


class IntSpace(BaseModel):
    """An integer in [low, high] by ``step``; ``log``: sampled log-uniformly (low >= 1, step 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["int"] = "int"
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntSpace:
        _check_bounds(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("a log-scaled int space takes step 1")
        return self

    def corners(self) -> list[Any]:
        return [self.low, self.high]


class CategoricalSpace(BaseModel):
    """One of ``choices`` (numbers, strings, booleans, or JSON values such as lists of MLP widths)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["categorical"] = "categorical"
    choices: list[Any] = Field(min_length=1)

    @field_validator("choices")
    @classmethod
    def _distinct(cls, v: list[Any]) -> list[Any]:
        encoded = [json.dumps(c, sort_keys=True) for c in v]
        if len(set(encoded)) != len(encoded):
            raise ValueError(f"choices must be distinct, got {v}")
        return v

    def corners(self) -> list[Any]:
        return list(self.choices)


Space = Annotated[FloatSpace | IntSpace | CategoricalSpace, Field(discriminator="kind")]
_SPACE: TypeAdapter[dict[str, Space]] = TypeAdapter(dict[str, Space])


def _check_bounds(low: float, high: float, log: bool) -> None:
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"low and high must be finite, got {low}, {high}")
    if low > high:
        raise ValueError(f"low {low} is above high {high}")
    if log and low <= 0:
        raise ValueError(f"a log-scaled space needs low > 0, got {low}")


def uniform(low: float, high: float) -> FloatSpace:
    return FloatSpace(low=low, high=high)


def log_uniform(low: float, high: float) -> FloatSpace:
    return FloatSpace(low=low, high=high, log=True)


def integer(low: int, high: int, step: int = 1) -> IntSpace:
    return IntSpace(low=low, high=high, step=step)


def choice(*choices: Any) -> CategoricalSpace:
    return CategoricalSpace(choices=list(choices))


def checked_space(data: Any, where: str = "tune space") -> dict[str, Space]:
    """A space from plain data (YAML), a bad one a one-line :class:`ConfigError` naming the key."""
    try:
        return _SPACE.validate_python(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {_space_message(e)}") from None


def _space_message(e: ValidationError) -> str:
    """``key: message`` (pydantic's location of a tagged union, ``key.float.low``, without its tag)."""
    parts = []
    for er in e.errors():
        loc = [str(x) for x in er["loc"] if x not in ("float", "int", "categorical")]
        msg = er["msg"].removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(" ".join(p.split()) for p in parts)


def _space_field(v: Any) -> dict[str, Any]:
    """Validator of a ``space`` field in a config (None values kept: they drop a declared dimension)."""
    if not isinstance(v, dict):
        raise ValueError(f"a space is a mapping of key -> {{kind, ...}}, got {type(v).__name__}")
    try:
        checked = _SPACE.validate_python({k: s for k, s in v.items() if s is not None})
    except ValidationError as e:
        raise ValueError(_space_message(e)) from None
    return {k: (checked[k] if k in checked else None) for k in v}


# The training settings every model searches: Adam's learning rate (log-uniform) and its L2 weight decay, the
# embedding regularization of FuxiCTR's spaces (log-uniform; 1e-8 is as good as none).
TRAIN_SPACE: dict[str, Space] = {"lr": log_uniform(1e-4, 1e-2), "weight_decay": log_uniform(1e-8, 1e-4)}
