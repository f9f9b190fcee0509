"""Declarative schema of a raw-sample log.

One schema drives preparation, models and tokenizers. It names the user key, the timestamp, the optional
instance id, the labels (each with an availability delay) and every feature field with its type and its
SIF group.

Example:
    >>> schema = Schema.model_validate({
    ...     "name": "toy", "user": "uid", "timestamp": "ts", "item": "iid",
    ...     "labels": [{"name": "click"}],
    ...     "features": [{"name": "uid", "type": "categorical", "group": "user"},
    ...                  {"name": "iid", "type": "categorical", "group": "item"}],
    ...     "sequence": {"fields": ["iid"], "max_len": 20}})
    >>> [f.name for f in schema.fields_of_group("item")]
    ['iid']
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sampletok.errors import SchemaError, load_yaml_mapping

GROUPS: tuple[str, ...] = ("user", "item", "context", "cross")


class FieldType(str, Enum):
    categorical = "categorical"
    multi_categorical = "multi_categorical"
    numeric = "numeric"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureField(_Strict):
    """One feature column of the raw sample."""

    name: str
    type: FieldType
    group: Literal["user", "item", "context", "cross"]
    # categorical / multi_categorical
    min_count: int = Field(1, ge=1, description="values seen fewer times in train map to OOV")
    embed_dim: int | None = Field(None, ge=1, description="overrides the model's embedding dim")
    separator: str = Field("|", description="splits a string cell of a multi_categorical field")
    max_len: int = Field(8, ge=1, description="values kept per multi_categorical cell")
    # numeric
    normalize: Literal["none", "standard", "log_standard", "bucketize"] = "standard"
    buckets: int = Field(16, ge=2, description="quantile buckets when normalize=bucketize")
    nan_policy: Literal["error", "fill"] = "error"
    fill_value: float = 0.0
    # SIF: pin this field to a sub-token index inside its group (None = assigned in order)
    sub_token: int | None = Field(None, ge=0)

    @property
    def is_categorical_like(self) -> bool:
        """True when the prepared column holds vocabulary codes (incl. bucketized numerics)."""
        return self.type != FieldType.numeric or self.normalize == "bucketize"


class LabelSpec(_Strict):
    """A task label (trained on); ``delay`` seconds after the event it becomes known (visible to requests after
    ts+delay). On a past row it is also a response (see :class:`ResponseSpec`)."""

    name: str
    delay: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _no_side_labels(cls, data):
        if isinstance(data, dict) and "task" in data:
            if data["task"] is False:
                raise ValueError(
                    f"label '{data.get('name')}' has task: false; a column that is not trained on is a response:"
                    " declare it under responses: (type binary, numeric or categorical)"
                )
            data = {k: v for k, v in data.items() if k != "task"}
        return data


class ResponseSpec(_Strict):
    """An outcome of the event that is not trained on (click, play time, a reason code...). For the request it
    is never a feature; on a past row it is a history input, seen only once known: ``delay`` seconds after the
    event, or at the time in the ``known_at`` column (same unit as the timestamp; null = never known)."""

    name: str
    type: Literal["binary", "numeric", "categorical"] = "binary"
    # numeric: the same normalizations as numeric features, fitted on the training window
    normalize: Literal["none", "standard", "log_standard", "bucketize"] = "standard"
    buckets: int = Field(16, ge=2, description="quantile buckets when normalize=bucketize")
    min_count: int = Field(1, ge=1, description="categorical: values seen fewer times in train map to OOV")
    delay: int = Field(0, ge=0)
    known_at: str | None = Field(None, description="column with the time the response became known")

    @model_validator(mode="after")
    def _one_availability(self) -> ResponseSpec:
        if self.known_at is not None and self.delay:
            raise ValueError(f"response '{self.name}': give either delay or known_at, not both")
        return self

    @property
    def is_categorical_like(self) -> bool:
        """True when the prepared column holds vocabulary codes (categorical, bucketized numeric)."""
        return self.type == "categorical" or (self.type == "numeric" and self.normalize == "bucketize")

    @property
    def nan_policy(self) -> str:  # read by the numeric fitting shared with features
        return "error"

    @property
    def fill_value(self) -> float:
        return 0.0


class SequenceSpec(_Strict):
    """Fields that form the traditional item-ID behaviour sequence, read from the user's past rows."""

    fields: list[str]
    max_len: int = Field(50, ge=1)


class Schema(_Strict):
    """A raw-sample log: user key, timestamp, instance id, labels, features."""

    name: str
    user: str
    timestamp: str
    item: str | None = Field(None, description="item field, used for derived instance ids")
    instance_id: str | None = None
    timestamp_unit: Literal["s", "ms"] = "s"
    labels: list[LabelSpec]
    responses: list[ResponseSpec] = Field(default_factory=list)
    features: list[FeatureField]
    sequence: SequenceSpec | None = None
    allow_extra_columns: bool = False
    duplicates: Literal["error", "drop", "keep_first"] = Field(
        "error",
        description="rows repeating an instance id (derived: user, item, timestamp): error (naming both rows), "
        "drop every such row, or keep the first in file order; the count goes in the manifest",
    )

    @model_validator(mode="after")
    def _check_references(self) -> Schema:
        names = [f.name for f in self.features]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"feature fields defined twice: {dup}")
        if not self.labels:
            raise ValueError("at least one label is needed")
        outcomes = self.response_names
        dup = sorted({n for n in outcomes if outcomes.count(n) > 1})
        if dup:
            raise ValueError(f"labels/responses defined twice: {dup}")
        for r in self.responses:
            if r.name in names:
                raise ValueError(
                    f"response '{r.name}' is also a feature: a response is an outcome of the request, "
                    "never its feature (remove it from features)"
                )
            if r.known_at is not None and r.known_at in names + outcomes + [self.user, self.timestamp]:
                raise ValueError(f"response '{r.name}': known_at column '{r.known_at}' is used elsewhere")
        clash = sorted({l.name for l in self.labels} & set(names))
        if clash:
            raise ValueError(f"columns used both as label and feature: {clash}")
        if self.item is not None and self.item not in names:
            raise ValueError(f"item field '{self.item}' is not among the features")
        if self.sequence is not None:
            for f in self.sequence.fields:
                if f not in names:
                    raise ValueError(f"sequence field '{f}' is not among the features")
                if self.field(f).type == FieldType.numeric:
                    raise ValueError(f"sequence field '{f}' must be categorical or multi_categorical")
        if self.timestamp in names:
            raise ValueError("the timestamp column cannot also be a feature (derive hour/weekday instead)")
        return self

    # ------------------------------------------------------------------ access
    def field(self, name: str) -> FeatureField:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    def fields_of_group(self, group: str) -> list[FeatureField]:
        return [f for f in self.features if f.group == group]

    @property
    def task_labels(self) -> list[str]:
        return [l.name for l in self.labels]

    @property
    def response_names(self) -> list[str]:
        """What a past row contributes besides its features, in history order: the task labels, then the
        declared responses."""
        return [l.name for l in self.labels] + [r.name for r in self.responses]

    def response(self, name: str) -> ResponseSpec:
        for r in self.responses:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def ticks_per_second(self) -> int:
        """Timestamp ticks per second (1 for ``s``, 1000 for ``ms``)."""
        return 1000 if self.timestamp_unit == "ms" else 1

    def response_delays(self) -> list[int]:
        """Each response's (task labels first) availability delay in the log's timestamp unit (0 where a
        ``known_at`` column says when). Delays are seconds in the schema; this is the one place they are
        converted, so every reader of availability (history index, store exports) agrees on ms logs too."""
        delays = [l.delay for l in self.labels] + [r.delay for r in self.responses]
        return [d * self.ticks_per_second for d in delays]

    @property
    def task_delay(self) -> int:
        """The longest task-label delay in timestamp ticks: when a row's training target is complete."""
        return max(l.delay for l in self.labels) * self.ticks_per_second

    @property
    def raw_columns(self) -> list[str]:
        """Every column a raw log must have."""
        cols = [self.user, self.timestamp]
        if self.instance_id:
            cols.append(self.instance_id)
        cols += self.response_names
        cols += [r.known_at for r in self.responses if r.known_at]
        cols += [f.name for f in self.features if f.name not in cols]
        return cols

    def fingerprint(self) -> str:
        """Stable hash of the schema content (key order independent)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ io
    @classmethod
    def from_yaml(cls, path: str | Path) -> Schema:
        data = load_yaml_mapping(path, "schema", "name, user, timestamp, labels, features", SchemaError)
        return cls.from_dict(data, origin=str(path))

    @classmethod
    def from_dict(cls, data: dict, origin: str = "<dict>") -> Schema:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            msgs = []
            for err in e.errors():
                loc = ".".join(str(p) for p in err["loc"]) or "(root)"
                msgs.append(f"{loc}: {err['msg']}")
            raise SchemaError(f"{origin}: invalid schema: " + "; ".join(msgs)) from None

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))
