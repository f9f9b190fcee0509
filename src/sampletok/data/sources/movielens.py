"""MovieLens readers for both official layouts, from any path a user gives.

* ml-100k layout: ``u.data`` (tab: user, item, rating, ts), ``u.user`` (``|``), ``u.item`` (``|``, latin-1).
* ml-latest / ml-25m layout: ``ratings.csv``, ``movies.csv`` and optional ``tags.csv``.

A raw sample is one rating event with user fields, item fields, and context computed from the user's events
*strictly* before it (hour, weekday, gap since the previous earlier event, running count). Labels:
``click = rating >= 4`` (task) and ``rating`` (side label).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl

from sampletok.data.sources.files import FrameSource
from sampletok.errors import DataError
from sampletok.schema import Schema

ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


def shipped_schema(name: str) -> Schema:
    """A dataset schema shipped with the package (``ml-100k``, ``ml-latest``, ``synthetic``)."""
    path = resources.files("sampletok") / "configs" / "datasets" / f"{name}.yaml"
    if not path.is_file():
        raise DataError(str(path), f"no shipped schema named '{name}'")
    return Schema.from_yaml(str(path))


def detect_layout(path: str | Path) -> str:
    path = Path(path)
    if (path / "u.data").exists():
        return "ml-100k"
    if (path / "ratings.csv").exists():
        return "ml-latest"
    raise DataError(str(path), "not a MovieLens folder: expected u.data (ml-100k) or ratings.csv (ml-latest/ml-25m)")


def _need(path: Path, name: str) -> Path:
    p = path / name
    if not p.exists():
        raise DataError(str(p), "file not found")
    return p


def add_event_context(df: pl.DataFrame, user: str = "user_id", ts: str = "timestamp") -> pl.DataFrame:
    """hour, weekday, gap since the user's previous *strictly earlier* event (-1 if none), running count of
    strictly earlier events. Events at the same second never see each other."""
    groups = (
        df.group_by(user, ts)
        .agg(pl.len().alias("_n"))
        .sort(user, ts)
        .with_columns(
            user_count=(pl.col("_n").cum_sum().over(user) - pl.col("_n")).cast(pl.Float64),
            gap_prev=(pl.col(ts) - pl.col(ts).shift(1).over(user)).fill_null(-1).cast(pl.Float64),
        )
        .drop("_n")
    )
    dt = pl.from_epoch(pl.col(ts), time_unit="s")
    return df.join(groups, on=[user, ts], how="left", maintain_order="left").with_columns(
        hour=dt.dt.hour().cast(pl.Int64), weekday=dt.dt.weekday().cast(pl.Int64)
    )


def read_ml100k(path: str | Path) -> pl.DataFrame:
    path = Path(path)
    ratings = pl.read_csv(
        _need(path, "u.data"),
        separator="\t",
        has_header=False,
        new_columns=["user_id", "item_id", "rating", "timestamp"],
        schema_overrides={"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64},
    )
    users = pl.read_csv(
        _need(path, "u.user"),
        separator="|",
        has_header=False,
        new_columns=["user_id", "age", "gender", "occupation", "zip_code"],
        schema_overrides={
            "user_id": pl.Int64,
            "age": pl.Float64,
            "gender": pl.Utf8,
            "occupation": pl.Utf8,
            "zip_code": pl.Utf8,
        },
    )
    raw = _need(path, "u.item").read_bytes().decode("latin-1")
    items = pl.read_csv(
        raw.encode(),
        separator="|",
        has_header=False,
        quote_char=None,
        new_columns=["item_id", "title", "release_date", "video_release_date", "url", *ML100K_GENRES],
        schema_overrides={
            "item_id": pl.Int64,
            "release_date": pl.Utf8,
            "title": pl.Utf8,
            "video_release_date": pl.Utf8,
            "url": pl.Utf8,
        },
    )
    flags = items.select(ML100K_GENRES).to_numpy().astype(bool)
    names = np.array(ML100K_GENRES, dtype=object)
    genres = ["|".join(names[row]) for row in flags]  # 1,682 items: a tiny table, not a hot path
    items = items.select(
        "item_id",
        pl.Series("genres", genres),
        pl.col("release_date").str.slice(-4).cast(pl.Float64, strict=False).alias("release_year"),
    )
    df = (
        ratings.with_row_index("_order")
        .join(
            users.with_columns(zip_prefix=pl.col("zip_code").str.slice(0, 2)).drop("zip_code"), on="user_id", how="left"
        )
        .join(items, on="item_id", how="left")
        .sort("_order")
        .drop("_order")
    )
    df = add_event_context(df)
    return df.with_columns(
        click=(pl.col("rating") >= 4).cast(pl.Int8), release_year=pl.col("release_year").fill_null(0.0)
    )


def read_mllatest(path: str | Path) -> pl.DataFrame:
    path = Path(path)
    ratings = pl.read_csv(
        _need(path, "ratings.csv"),
        schema_overrides={"userId": pl.Int64, "movieId": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64},
    )
    movies = pl.read_csv(
        _need(path, "movies.csv"), schema_overrides={"movieId": pl.Int64, "title": pl.Utf8, "genres": pl.Utf8}
    )
    movies = movies.select(
        pl.col("movieId").alias("item_id"),
        pl.col("genres").str.replace("(no genres listed)", "", literal=True),
        pl.col("title").str.extract(r"\((\d{4})\)\s*$").cast(pl.Float64).fill_null(0.0).alias("release_year"),
    )
    df = (
        ratings.rename({"userId": "user_id", "movieId": "item_id"})
        .with_row_index("_order")
        .join(movies, on="item_id", how="left")
        .sort("_order")
        .drop("_order")
    )
    df = add_event_context(df)
    tags_path = path / "tags.csv"
    if tags_path.exists():
        tags = pl.read_csv(tags_path, schema_overrides={"userId": pl.Int64, "timestamp": pl.Int64}).select(
            pl.col("userId").alias("user_id"), pl.col("timestamp")
        )
        df = df.with_columns(user_tags_before=pl.Series(_count_strictly_before(df, tags).astype(np.float64)))
    else:
        df = df.with_columns(user_tags_before=pl.lit(0.0))
    return df.with_columns(click=(pl.col("rating") >= 4).cast(pl.Int8))


def _count_strictly_before(events: pl.DataFrame, marks: pl.DataFrame) -> np.ndarray:
    """For each event, how many ``marks`` rows of the same user have timestamp strictly before it."""
    m = marks.sort("user_id", "timestamp")
    mu, mt = m.get_column("user_id").to_numpy(), m.get_column("timestamp").to_numpy()
    eu, et = events.get_column("user_id").to_numpy(), events.get_column("timestamp").to_numpy()
    base = int(min(mt.min(initial=0), et.min())) - 1
    span = int(max(mt.max(initial=0), et.max())) - base + 1
    key_m = mu.astype(np.int64) * span + (mt - base)
    left = np.searchsorted(key_m, eu.astype(np.int64) * span, side="left")
    right = np.searchsorted(key_m, eu.astype(np.int64) * span + (et - base), side="left")
    return right - left


def load_movielens(path: str | Path) -> tuple[FrameSource, Schema]:
    """The raw-sample log and shipped schema of a MovieLens folder (layout detected)."""
    layout = detect_layout(path)
    df = read_ml100k(path) if layout == "ml-100k" else read_mllatest(path)
    schema = shipped_schema(layout)
    return FrameSource(df.select(schema.raw_columns), name=f"{path} ({layout})"), schema
