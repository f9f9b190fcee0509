"""The token exports as Ray Data jobs: SIF's codes (one task per store segment) and IAT's embeddings (one task
per range of rows: pre-SIT tokens, which depend on their row and its history, read by every task from the
memory-mapped dataset; post-SIT tokens also depend on the user's window of tokens and stay local).

The driver creates the staged token store and puts the frozen model in Ray's object store; each task opens the
prepared dataset (memory-mapped) and the staged store, encodes its rows with :func:`code_segment` (the local
engine's function) and writes them as one segment. The driver adds the segments in row order and commits once:
a failed task fails the job before the commit, so readers keep the previous store. The store's folder must be
on a filesystem every worker sees. Ray is an optional extra (``pip install 'sampletok[ray]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sampletok.data.ray_engine import map_with_ray, ray_module

if TYPE_CHECKING:
    import numpy as np

    from sampletok.data.prepare import PreparedDataset
    from sampletok.models.sif import SIF
    from sampletok.store import LocalTokenStore
    from sampletok.tokenizers.iat import SourceModel

ROWS_PER_TASK = 1 << 20  # IAT: rows a task embeds (its result travels back through Ray's object store)


def embed_rows_with_ray(model: SourceModel, ds: PreparedDataset, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """[len(rows), emb_dim] pre-SIT IAT tokens of ``rows``, one Ray task per ``ROWS_PER_TASK`` of them."""
    import numpy as np

    out = np.zeros((len(rows), model.cfg.emb_dim), np.float32)
    if len(rows) == 0:
        return out
    state = {"model": ray_module().put(model.eval()), "dataset": str(ds.root.resolve()), "batch_size": batch_size}
    tasks = [{"index": i, "rows": rows[i : i + ROWS_PER_TASK]} for i in range(0, len(rows), ROWS_PER_TASK)]
    for r in map_with_ray(_EmbedRows, state, tasks):
        i = int(r["index"])  # the range's first position in `rows`
        out[i : i + len(r["emb"])] = r["emb"]
    return out


class _EmbedRows:
    """A Ray Data map actor: the source model and the dataset (memory-mapped, with its history index) opened
    once, then the tokens of one range of rows per task."""

    def __init__(self, state: dict[str, Any]):
        import numpy as np
        import ray
        import torch

        from sampletok.data.batches import BatchLoader, history_index
        from sampletok.data.prepare import PreparedDataset

        torch.set_num_threads(1)  # one actor per CPU
        self.model = ray.get(state["model"]).eval()
        ds = PreparedDataset(state["dataset"])
        self.loader = BatchLoader(
            ds, np.zeros(0, np.int64), state["batch_size"], index=history_index(ds), hist_len=self.model.cfg.hist_len
        )
        self.batch_size = state["batch_size"]

    def __call__(self, task: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        rows = np.asarray(task["rows"], np.int64)
        parts = []
        with torch.inference_mode():
            for i in range(0, len(rows), self.batch_size):  # a loop over batches, not rows
                parts.append(self.model.compress(self.loader.build(rows[i : i + self.batch_size])).numpy())
        return {"index": task["index"], "emb": np.concatenate(parts).astype(np.float32)}


def encode_segments_with_ray(
    model: SIF, ds: PreparedDataset, store: LocalTokenStore, ranges: list[tuple[int, int]], batch_size: int
) -> list[str]:
    """Encode each row range [lo, hi) of ``ds`` as one segment of the staged ``store`` in a Ray task; the
    segments' names in the order of ``ranges``."""
    if not ranges:
        return []
    state = {
        "model": ray_module().put(model),
        "dataset": str(ds.root.resolve()),
        "store": str(store.root.resolve()),
        "manifest": store.manifest,
        "batch_size": batch_size,
    }
    tasks = [{"index": i, "lo": lo, "hi": hi} for i, (lo, hi) in enumerate(ranges)]
    return [r["segment"] for r in map_with_ray(_EncodeSegment, state, tasks)]


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
