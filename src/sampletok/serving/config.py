"""The service's typed config: what ``sampletok serve`` takes, validated once (a bad value is a one-line error).

Example:
    >>> ServingConfig(max_candidates=50).host
    '127.0.0.1'
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from sampletok.errors import ConfigError


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
    expose_history_gap: bool = Field(
        False,
        description="reply with the age of the most recent history event (it reveals event times: trusted callers)",
    )


def read_token_file(path: str | Path) -> str:
    """The bearer token in ``path`` (its first line, whitespace stripped): at least 16 characters."""
    try:
        token = Path(path).read_text().strip().splitlines()[0].strip() if Path(path).read_text().strip() else ""
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the token file ({e.strerror})") from None
    if len(token) < 16:
        raise ConfigError(f"{path}: the token must be at least 16 characters")
    return token
