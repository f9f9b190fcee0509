"""Data-parallel training on CPU with gloo and 2 real processes (torchrun): it finishes, every rank holds the
same SIF codebooks (EMA statistics all-reduced, restarts broadcast) and the same weights, and the test AUC is
within noise of the 1-process run of the same set-up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from sampletok.data.prepare import prepare
from sampletok.data.sources.synthetic import SyntheticConfig, generate_source

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_gloo_ranks_train_to_the_same_model_as_one_process(tmp_path):
    src, schema = generate_source(SyntheticConfig(n_users=200, events_per_user=30, n_items=150, n_fields=16, seed=5))
    ds = prepare(src, schema, tmp_path / "ds", progress=False)
    out = tmp_path / "out"
    out.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(_free_port())]  # fmt: skip
    _run([*torchrun, str(WORKER), str(ds.root), str(out)], out)
    _run([sys.executable, str(WORKER), str(ds.root), str(out)], out)
    r0, r1 = (torch.load(out / f"rank{r}-of-2.pt", weights_only=False) for r in (0, 1))
    single = torch.load(out / "rank0-of-1.pt", weights_only=False)
    for key in ("codebook", "ema_count", "head"):
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0)
    assert r0["test"] == r1["test"]  # the gathered predictions: the same metrics on both ranks
    assert r0["test"]["n"] == single["test"]["n"] == len(ds.rows("test"))
    assert abs(r0["test"]["auc"] - single["test"]["auc"]) < 0.03, (r0["test"], single["test"])


def test_torchrun_cli_train_writes_one_run(tmp_path):
    """`torchrun --nproc-per-node 2 -m sampletok.cli train ...`: both ranks train, rank 0 writes the run."""
    src, schema = generate_source(SyntheticConfig(n_users=150, events_per_user=20, n_items=100, n_fields=16, seed=2))
    ds = prepare(src, schema, tmp_path / "ds", progress=False)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(_free_port())]  # fmt: skip
    run = tmp_path / "run"
    _run([*torchrun, "-m", "sampletok.cli", "train", "--data", str(ds.root), "--model", "din", "--epochs", "1",
          "--out", str(run), "--device", "cpu"], run)  # fmt: skip
    import json

    result = json.loads((run / "result.json").read_text())
    assert result["world_size"] == 2 and result["test"]["n"] == len(ds.rows("test"))
    assert (run / "model.pt").exists() and (run / "checkpoint.pt").exists()
