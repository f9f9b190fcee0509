"""The KuaiRand reader on a tiny log in its shipped layout: repeated events kept by the reader and removed by
the schema's duplicates policy (counted in the manifest), context from strictly earlier seconds only, bad
cells and unknown users reported with file, column and row."""

import polars as pl
import pytest

from sampletok.data.prepare import prepare
from sampletok.data.sources.kuairand import load_kuairand, read_kuairand
from sampletok.errors import DataError

HEADER = (
    "user_id\tvideo_id\tdate\thourmin\ttime_ms\tis_click\tis_follow\tis_comment\tis_forward\tlong_view\t"
    "play_time_ms\tduration_ms\tcomment_stay_time\tis_profile_enter\tlabel\ttimestamp"
)


def _event(user, video, t_ms, label=1):
    return f"{user}\t{video}\t20220410\t1700\t{t_ms}\t1\t0\t0\t0\t1\t4000\t8000\t0\t0\t{label}\tx"


def _write(folder, events, users=(1, 2)):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "likes.tsv").write_text("\n".join([HEADER, *events]) + "\n")
    from sampletok.data.sources.movielens import shipped_schema

    cols = [f.name for f in shipped_schema("kuairand").features if f.group == "user" and f.name != "user_id"]
    rows = ["user_id," + ",".join(cols)] + [f"{u}," + ",".join("1" for _ in cols) for u in users]
    (folder / "user_features.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_repeats_are_removed_by_the_policy_and_context_counts_strictly_earlier_seconds(tmp_path):
    events = [
        _event(1, 10, 1_000_000),
        _event(1, 10, 1_000_000),
        _event(1, 11, 1_000_400),
        _event(1, 12, 5_000_000),
        _event(2, 10, 2_000_000),
    ]
    frame = read_kuairand(_write(tmp_path / "k", events))
    assert frame.height == 5
    u1 = frame.filter(pl.col("user_id") == "1").unique(["video_id", "time_ms"], maintain_order=True).sort("time_ms")
    # the two events of the same second see nothing of each other; the later one sees both (a repeat counts once)
    assert u1["user_count"].to_list() == [0.0, 0.0, 2.0]
    assert u1["play_ratio"].to_list() == [0.5, 0.5, 0.5]
    source, schema = load_kuairand(tmp_path / "k")
    assert schema.timestamp_unit == "ms" and set(source.columns) == set(schema.raw_columns)
    ds = prepare(source, schema, tmp_path / "ds", progress=False)
    assert ds.n_rows == 4
    assert ds.manifest["duplicates"] == {"policy": "keep_first", "repeated_ids": 1, "rows_removed": 1}


@pytest.mark.parametrize(
    "events, users, needle",
    [
        (
            [_event(1, 10, 1_000_000), _event(1, 11, "soon")],
            (1,),
            "likes.tsv, column 'time_ms', row 3: expected an integer",
        ),
        (
            [_event(1, 10, 1_000_000), _event(3, 11, 2_000_000)],
            (1,),
            "likes.tsv, column 'user_id', row 3: user '3' is not",
        ),
    ],
)
def test_bad_input_names_file_column_and_row(tmp_path, events, users, needle):
    with pytest.raises(DataError) as e:
        read_kuairand(_write(tmp_path / "k", events, users))
    assert needle in str(e.value) and "\n" not in str(e.value)
