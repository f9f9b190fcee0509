"""The service's typed config: what ``sampletok serve`` takes, validated once (a bad value is a one-line error).

Example:
    >>> ServingConfig(max_candidates=50).host
    '127.0.0.1'
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sampletok.errors import ConfigError
from sampletok.store.locations import is_redis_url


class ServingConfig(BaseModel):
    """Where the service listens, where its stores live and what one request may carry."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str = Field("127.0.0.1", description="interface to listen on (loopback unless exposed on purpose)")
    port: int = Field(8000, ge=1, le=65535)
    store: str = Field("runs/serve-store", description="the event and token stores: a directory or redis:// URL")
    reset: bool = Field(False, description="rebuild the stores from the dataset (dropping appended events)")
    max_candidates: int = Field(1000, ge=1, description="the most candidates one request may carry")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="the largest request body (413 above it)")
    token: str | None = Field(None, min_length=16, description="bearer token /score and /events require (None: open)")
    max_batch_candidates: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="the dynamic batcher's most candidates in one model forward (1: no batching; auto: chosen at "
        "start by timing this model on a probe request of probe_candidates, alone and in groups)",
    )
    probe_candidates: int = Field(100, ge=1, description="the probe request's candidates for auto batching")
    max_wait_us: int = Field(500, ge=0, le=1_000_000, description="how long a batch waits for more requests (µs)")
    max_queue: int = Field(16, ge=1, description="requests waiting beyond this are refused: 503 with Retry-After")
    threads: int = Field(
        1, ge=1, le=256, description="torch intra-op threads per process (scale out with workers, not threads)"
    )
    workers: int = Field(1, ge=1, le=64, description="service processes (more than one needs a redis:// store)")
    expose_history_gap: bool = Field(
        False,
        description="reply with the age of the most recent history event (it reveals event times: trusted callers)",
    )

    @field_validator("max_batch_candidates", mode="before")
    @classmethod
    def _count_or_auto(cls, v: object) -> object:
        if isinstance(v, str) and v != "auto" and not v.strip().isdigit():
            raise ValueError(f"expected a number of candidates or auto, got {v!r}")
        return int(v) if isinstance(v, str) and v != "auto" else v

    @model_validator(mode="after")
    def _one_process_for_a_local_store(self) -> ServingConfig:
        if self.workers > 1 and not is_redis_url(self.store):
            raise ValueError(
                "workers > 1 needs a redis:// store: the local store is served by one process (its appends "
                "and the readers' index live in that process)"
            )
        return self


def read_token_file(path: str | Path) -> str:
    """The bearer token in ``path`` (its first line, whitespace stripped): at least 16 characters."""
    try:
        token = Path(path).read_text().strip().splitlines()[0].strip() if Path(path).read_text().strip() else ""
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the token file ({e.strerror})") from None
    if len(token) < 16:
        raise ConfigError(f"{path}: the token must be at least 16 characters")
    return token
