"""Shared fixtures. Tests that need ../shared/data skip where it is absent, but fail when CI=true."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sampletok.data.dataset import PreparedDataset, SplitSpec
from sampletok.data.prepare import prepare
from sampletok.data.sources import FrameSource
from sampletok.data.sources.synthetic import SyntheticConfig, generate_source
from sampletok.schema import Schema

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SAMPLETOK_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip (fail under CI=true) when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{p} is missing but CI=true: CI must run the real-data tests")
        pytest.skip(f"{p} not present (real-data test)")
    return p


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    return shared_path("ml-100k")


TOY_SCHEMA = {
    "name": "toy",
    "user": "uid",
    "timestamp": "ts",
    "item": "iid",
    "labels": [{"name": "click"}],
    "responses": [{"name": "buy", "type": "binary", "delay": 5}],
    "features": [
        {"name": "uid", "type": "categorical", "group": "user"},
        {"name": "iid", "type": "categorical", "group": "item"},
        {"name": "tags", "type": "multi_categorical", "group": "item", "max_len": 3},
        {"name": "price", "type": "numeric", "group": "context"},
        {"name": "pop", "type": "numeric", "group": "context", "normalize": "bucketize", "buckets": 4},
    ],
    "sequence": {"fields": ["iid", "tags"], "max_len": 4},
}


@pytest.fixture
def toy_schema() -> Schema:
    return Schema.model_validate(TOY_SCHEMA)


def toy_frame(n: int = 200, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return (
        pl.DataFrame(
            {
                "uid": rng.integers(0, 12, n),
                "ts": rng.integers(0, 50, n).astype(np.int64),
                "click": rng.integers(0, 2, n),
                "buy": rng.integers(0, 2, n),
                "iid": rng.integers(0, 30, n),
                "tags": ["|".join(map(str, rng.integers(0, 5, rng.integers(0, 4)))) for _ in range(n)],
                "price": rng.normal(10, 2, n),
                "pop": rng.exponential(1, n),
            }
        )
        .with_row_index("row")
        .with_columns(iid=pl.col("iid") + pl.col("row") * 0)
        .drop("row")
    )


@pytest.fixture
def toy_prepared(tmp_path, toy_schema) -> PreparedDataset:
    # unique (uid, iid, ts) so derived instance ids are unique
    df = toy_frame().unique(subset=["uid", "iid", "ts"], keep="first", maintain_order=True)
    return prepare(FrameSource(df, "toy"), toy_schema, tmp_path / "toy", progress=False)


SMALL_SYNTH = SyntheticConfig(n_users=300, n_items=300, events_per_user=40, n_fields=20, days=30, seed=3)


@pytest.fixture(scope="session")
def synth_prepared(tmp_path_factory) -> PreparedDataset:
    src, schema = generate_source(SMALL_SYNTH)
    return prepare(src, schema, tmp_path_factory.mktemp("synth") / "ds", SplitSpec(), progress=False).load_into_memory()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A real ``redis-server`` on a free loopback port in a temporary folder, stopped at the end. Skips where
    the server is not installed, but fails when CI=true (``.ci/run`` installs it)."""
    import shutil

    from sampletok.store.redis import local_redis_server

    if shutil.which("redis-server") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("redis-server is missing but CI=true: .ci/run must install it")
        pytest.skip("redis-server not installed (apt-get install -y redis-server)")
    with local_redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url
