"""One rank of the data-parallel test (tests/test_distributed.py launches it with torchrun): trains a small SIF
with the library's own fit() and writes what the test compares (this rank's codebooks and the test AUC)."""

import sys
from pathlib import Path

import torch

from sampletok import distributed
from sampletok.data.batches import BatchLoader
from sampletok.data.dataset import PreparedDataset
from sampletok.features import FeatureLayout
from sampletok.models import build_model
from sampletok.train.trainer import TrainConfig, evaluate, fit, set_seed


def main(data: str, out: str) -> None:
    distributed.init()
    torch.set_num_threads(1)
    ds = PreparedDataset(data).load_into_memory()
    set_seed(0)
    model = build_model("sif", FeatureLayout.from_dataset(ds), hgaq={"fields_per_token": 8, "codes": 16},
                        width=16, blocks=1, heads=2)  # fmt: skip
    cfg = TrainConfig(max_epochs=2, batch_size=256, hist_len=8, patience=5, threads=1)

    def loader(split: str, shuffle: bool) -> BatchLoader:
        return BatchLoader(ds, ds.rows(split), 256, hist_len=8, shuffle=shuffle, seed=0, history_samples=True)

    fit(model, loader("train", True), loader("valid", False), cfg, seed=0, progress=False)
    test = evaluate(model, loader("test", False))
    rvq = model.tokenizer.rvq
    state = {"codebook": rvq.codebook, "ema_count": rvq.ema_count, "head": model.head[0].weight, "test": test}
    torch.save(state, Path(out) / f"rank{distributed.rank()}-of-{distributed.world_size()}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
