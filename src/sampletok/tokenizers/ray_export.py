"""SIF's code export as a Ray Data job: one task per segment of rows.

The driver creates the staged token store and puts the frozen model in Ray's object store; each task opens the
prepared dataset (memory-mapped) and the staged store, encodes its rows with :func:`code_segment` (the local
engine's function) and writes them as one segment. The driver adds the segments in row order and commits once:
a failed task fails the job before the commit, so readers keep the previous store. The store's folder must be
on a filesystem every worker sees. Ray is an optional extra (``pip install 'sampletok[ray]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sampletok.errors import ConfigError

if TYPE_CHECKING:
    from sampletok.data.prepare import PreparedDataset
    from sampletok.models.sif import SIF
    from sampletok.store import LocalTokenStore


def encode_segments_with_ray(
    model: SIF, ds: PreparedDataset, store: LocalTokenStore, ranges: list[tuple[int, int]], batch_size: int
) -> list[str]:
    """Encode each row range [lo, hi) of ``ds`` as one segment of the staged ``store`` in a Ray task; the
    segments' names in the order of ``ranges``."""
    try:
        import ray
    except ImportError:
        raise ConfigError("engine ray needs Ray: pip install 'sampletok[ray]'") from None
    if not ranges:
        return []
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    state = {
        "model": ray.put(model),
        "dataset": str(ds.root.resolve()),
        "store": str(store.root.resolve()),
        "manifest": store.manifest,
        "batch_size": batch_size,
    }
    tasks = [{"index": i, "lo": lo, "hi": hi} for i, (lo, hi) in enumerate(ranges)]
    actors = max(1, min(len(tasks), int(ray.cluster_resources().get("CPU", 1))))
    job = ray.data.from_items(tasks).map(
        _EncodeSegment,  # type: ignore[arg-type]
        fn_constructor_kwargs={"state": state},
        concurrency=actors,
    )
    results = sorted(job.take_all(), key=lambda r: r["index"])
    if [r["index"] for r in results] != list(range(len(ranges))):
        raise RuntimeError(f"ray export returned segments {[r['index'] for r in results]} of {len(ranges)}")
    return [r["segment"] for r in results]


class _EncodeSegment:
    """A Ray Data map actor: the model, dataset and staged store opened once, then one segment per task."""

    def __init__(self, state: dict[str, Any]):
        from pathlib import Path

        import ray
        import torch

        from sampletok.data.prepare import PreparedDataset
        from sampletok.store import LocalTokenStore
        from sampletok.tokenizers.steps import no_history_loader

        torch.set_num_threads(1)  # one actor per CPU
        self.model = ray.get(state["model"]).eval()
        self.ds = PreparedDataset(state["dataset"])
        self.loader = no_history_loader(self.ds)
        self.store = LocalTokenStore(Path(state["store"]), state["manifest"], "", staged=True)
        self.batch_size = state["batch_size"]

    def __call__(self, task: dict[str, Any]) -> dict[str, Any]:
        from sampletok.tokenizers.steps import code_segment

        name = code_segment(
            self.model, self.ds, self.loader, self.store, task["lo"], task["hi"], self.batch_size, workers=1
        )
        return {"index": task["index"], "segment": name}
