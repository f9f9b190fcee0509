"""``prepare --engine ray``: the encode pass (pass 3, the expensive one) as a Ray Data job over the input files.

Passes 1 and 2 (keys, fitting the vocabularies on the training window) stay on the driver: they read a few
columns and produce the small state every worker needs. The encode pass is one Ray Data dataset with a row per
input file (a Parquet partition or a CSV file) and its first output row; each task re-reads its file in the
same chunks as the local engine, encodes it with the driver's vocabularies (:func:`encode_chunk`) and writes
its rows into the staged column files at its offset. The driver then checksums the columns and publishes the
dataset with one rename, as the local engine does: a failed task fails the job, the staged folder is removed
and the previous dataset stays readable. The output is identical to the local engine's (tested on a local
two-worker cluster).

The staged folder must be on a filesystem every worker sees (one machine, or a shared mount). Ray is an
optional extra (``pip install 'sampletok[ray]'``); with no cluster running, ``ray.init`` starts a local one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sampletok.errors import ConfigError, DataError

if TYPE_CHECKING:
    from sampletok.data.codec import FieldStats
    from sampletok.data.sources.files import FileSource
    from sampletok.schema import Schema


def encode_with_ray(
    source: FileSource,
    schema: Schema,
    stats: dict[str, FieldStats],
    source_split: np.ndarray,
    columns_dir: Path,
    row_counts: dict[str, int],
) -> None:
    """Encode every kept row (``source_split >= 0``, in source order) of ``source`` into the column files of
    ``columns_dir`` (created by the driver at their final size), one Ray task per input file."""
    tasks: list[dict[str, Any]] = []
    read, written = 0, 0
    for i, path in enumerate(source.paths):
        n = row_counts.get(str(path), 0)
        keep = source_split[read : read + n]
        # absolute paths: a worker's working directory need not be the driver's
        tasks.append({"index": i, "path": str(path.resolve()), "first": written, "split": keep})
        read, written = read + n, written + int((keep >= 0).sum())
    state = {
        "schema": schema,
        "stats": stats,
        "columns_dir": str(columns_dir.resolve()),
        "chunk_rows": source.chunk_rows,
        "delimiter": source.delimiter,
    }
    results = map_with_ray(_EncodeFile, state, tasks)  # in source order: the first bad file is reported
    failed = [r for r in results if r["error"]]
    if failed:  # a task's bad input: the same one-line error as the local engine's (not Ray's wrapped traceback)
        origin, message, column, row = failed[0]["error"]
        raise DataError(origin, message, column, row)
    rows = sum(int(r["rows"]) for r in results)
    if rows != written:
        raise RuntimeError(f"ray encode wrote {rows} rows, expected {written}")


def ray_module() -> Any:
    """The ``ray`` module, connected to a running cluster or a local one it starts (a one-line error without
    the extra)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'sampletok[ray]'") from None
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    return ray


def map_with_ray(actor: type, state: dict[str, Any], tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``actor(state)(task)`` over ``tasks`` (each with an ``index``) as one Ray Data job, one actor per CPU
    of the cluster and never more than tasks (each actor opens what ``state`` names once); the results in task
    order, every task's present."""
    ray = ray_module()
    actors = max(1, min(len(tasks), int(ray.cluster_resources().get("CPU", 1))))
    job = ray.data.from_items(tasks).map(actor, fn_constructor_kwargs={"state": state}, concurrency=actors)
    results = sorted(job.take_all(), key=lambda r: int(r["index"]))
    if [int(r["index"]) for r in results] != [int(t["index"]) for t in tasks]:
        raise RuntimeError(f"the ray job returned {len(results)} results for {len(tasks)} tasks")
    return results


class _EncodeFile:
    """A Ray Data map actor: opens the staged column files once, then encodes the files it is given."""

    def __init__(self, state: dict[str, Any]):
        from sampletok.data.codec import vocab_lookups

        self.schema, self.stats = state["schema"], state["stats"]
        self.lookup = vocab_lookups(self.stats)
        self.chunk_rows, self.delimiter = state["chunk_rows"], state["delimiter"]
        folder = Path(state["columns_dir"])
        self.arrays = {p.stem: np.load(p, mmap_mode="r+") for p in folder.glob("*.npy")}

    def __call__(self, task: dict[str, Any]) -> dict[str, Any]:
        out = {"index": task["index"], "path": task["path"], "rows": 0, "error": None}
        try:
            out["rows"] = self._encode(task)
        except DataError as e:
            out["error"] = [e.origin, e.message, e.column, e.row]
        return out

    def _encode(self, task: dict[str, Any]) -> int:
        from sampletok.data.codec import encode_chunk, response_and_feature_columns
        from sampletok.data.sources.files import FileSource

        source = FileSource([task["path"]], chunk_rows=self.chunk_rows, delimiter=self.delimiter)
        split = np.asarray(task["split"])
        written, offset = int(task["first"]), 0
        for chunk in source.iter_chunks(response_and_feature_columns(self.schema)):
            h = chunk.frame.height
            in_log = split[offset : offset + h] >= 0
            offset += h
            sl = slice(written, written + int(in_log.sum()))
            written = sl.stop
            for name, values in encode_chunk(chunk, self.schema, self.stats, self.lookup).items():
                self.arrays[name][sl] = values[in_log]
        for a in self.arrays.values():
            a.flush()
        return written - int(task["first"])
