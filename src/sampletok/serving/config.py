"""The service's typed config: what ``sampletok serve`` takes, validated once (a bad value is a one-line error).

Example:
    >>> ServingConfig(max_candidates=50).host
    '127.0.0.1'
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServingConfig(BaseModel):
    """Where the service listens, where its stores live and what one request may carry."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str = Field("127.0.0.1", description="interface to listen on (loopback unless exposed on purpose)")
    port: int = Field(8000, ge=1, le=65535)
    store: str = Field("runs/serve-store", description="the event and token stores: a directory or redis:// URL")
    reset: bool = Field(False, description="rebuild the stores from the dataset (dropping appended events)")
    max_candidates: int = Field(1000, ge=1, description="the most candidates one request may carry")
