"""KuaiRand reader (the shipped like/hate layout): ``likes.tsv`` (tab-separated events with their responses)
joined with ``user_features.csv`` on ``user_id``, from any path a user gives.

A raw sample is one event: user fields, the video and its length, the hour, and context computed from the
user's events *strictly* before it (gap since the previous earlier event, running count; at second
granularity, so events of the same feed load never see each other; repeated events count once). The
event's outcomes are ``label`` (like/hate, the task) and the schema's responses: click, long view, comment,
follow, forward, profile entry, play time (seconds), play/length ratio and comment stay time.

Repeated rows: the log holds exact duplicate rows and rows repeating (user, video, time). The reader keeps
them; the shipped schema's ``duplicates: keep_first`` removes all but the first of each when preparing and
the manifest reports how many (``duplicates.rows_removed``).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from sampletok.data.sources.files import FrameSource
from sampletok.data.sources.movielens import _need, shipped_schema
from sampletok.errors import DataError
from sampletok.schema import Schema

RESPONSES = ["is_click", "long_view", "is_comment", "is_follow", "is_forward", "is_profile_enter"]


def read_kuairand(path: str | Path) -> pl.DataFrame:
    """The joined raw-sample frame of a KuaiRand likes folder, in file order."""
    path = Path(path)
    events = pl.read_csv(_need(path, "likes.tsv"), separator="\t", infer_schema_length=0)
    users = pl.read_csv(_need(path, "user_features.csv"), infer_schema_length=0)
    need = [
        "user_id", "video_id", "time_ms", "hourmin", "duration_ms", "play_time_ms", "comment_stay_time", "label",
        *RESPONSES,
    ]  # fmt: skip
    missing = [c for c in need if c not in events.columns]
    if missing:
        raise DataError(str(path / "likes.tsv"), f"missing columns {missing} (not the KuaiRand likes layout)")
    nums = ["time_ms", "duration_ms", "play_time_ms", "comment_stay_time", "label", *RESPONSES]
    events = events.with_row_index("_order").with_columns([pl.col(c).cast(pl.Int64, strict=False) for c in nums])
    bad = events.filter(pl.any_horizontal([pl.col(c).is_null() for c in nums]))
    if bad.height:
        row = int(bad["_order"][0]) + 2  # 1-based, after the header
        col = next(c for c in nums if bad[c][0] is None)
        raise DataError(str(path / "likes.tsv"), "expected an integer", col, row)
    unknown = events.join(users, on="user_id", how="anti").sort("_order")
    if unknown.height:
        raise DataError(
            str(path / "likes.tsv"),
            f"user {unknown['user_id'][0]!r} is not in user_features.csv",
            "user_id",
            int(unknown["_order"][0]) + 2,  # 1-based, after the header
        )
    df = events.join(users, on="user_id", how="left").sort("_order")
    df = df.with_columns(_ts_s=pl.col("time_ms") // 1000)
    ctx = (
        df.unique(subset=["user_id", "video_id", "time_ms"])  # a repeated event counts once
        .group_by("user_id", "_ts_s")
        .agg(pl.len().alias("_n"))
        .sort("user_id", "_ts_s")
        .with_columns(
            user_count=(pl.col("_n").cum_sum().over("user_id") - pl.col("_n")).cast(pl.Float64),
            gap_prev=(pl.col("_ts_s") - pl.col("_ts_s").shift(1).over("user_id")).fill_null(-1).cast(pl.Float64),
        )
        .drop("_n")
    )
    df = df.join(ctx, on=["user_id", "_ts_s"], how="left", maintain_order="left")
    play_s = pl.col("play_time_ms").cast(pl.Float64) / 1000.0
    dur_s = pl.col("duration_ms").cast(pl.Float64) / 1000.0
    df = df.with_columns(
        hour=(pl.col("hourmin").cast(pl.Int64, strict=False) // 100).fill_null(-1),
        duration_s=dur_s,
        play_time_s=play_s,
        play_ratio=pl.when(dur_s > 0).then((play_s / dur_s).clip(0.0, 5.0)).otherwise(0.0),
        comment_stay_s=pl.col("comment_stay_time").cast(pl.Float64) / 1000.0,
    ).drop("_order", "_ts_s")
    return df


def load_kuairand(path: str | Path) -> tuple[FrameSource, Schema]:
    """The raw-sample log and shipped schema of a KuaiRand likes folder."""
    frame = read_kuairand(path)
    schema = shipped_schema("kuairand")
    return FrameSource(frame.select(schema.raw_columns), name=f"{path} (kuairand)"), schema
