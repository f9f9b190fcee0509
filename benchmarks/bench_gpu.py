"""Training samples/s and scoring latency of DIN, OneTrans and SIF at history L = 256 and 1,024 on one device,
on the embedded synthetic log (no download), so it runs in one short command on any CUDA machine:

    python benchmarks/bench_gpu.py                       # device auto: CUDA when available
    python benchmarks/bench_gpu.py --device cpu --users 300 --steps 3 --lengths 64   # a smoke run anywhere
    python benchmarks/bench_gpu.py --bf16                # bfloat16 autocast

Batches are built on the CPU by the library's loader (as in training) and moved once per step; the timed
region includes that move, the forward, backward and Adam step (training), or the forward of one request's
batch (scoring latency, P50/P99 over ``--requests``). SIF is timed in joint training (history quantized on the
fly) and scored from exported codes (as deployed). A second table times HGAQ's nearest-code search
(``ResidualVQ.encode``, T = 9, M = 3, V = 256, d0 = 16) through each ``hgaq.kernel`` on the device.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PARAMS = {"sif": {"hgaq": {"fields_per_token": 4}, "width": 32, "blocks": 2, "heads": 4}, "din": {}, "onetrans": {}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    from sampletok.data.batches import BatchLoader, TokenSource, history_index
    from sampletok.data.dataset import SplitSpec
    from sampletok.data.prepare import prepare
    from sampletok.data.sources.synthetic import SyntheticConfig, generate_source
    from sampletok.features import FeatureLayout
    from sampletok.models import build_model
    from sampletok.tokens.sif import export_codes
    from sampletok.train.trainer import TrainConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--events", type=int, default=1100, help="events per user (L = 1,024 needs more than 1,024)")
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--models", default="din,onetrans,sif")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--encode-rows", type=int, default=262_144, help="rows of the HGAQ kernel table (0: skip)")
    a = ap.parse_args()
    device = TrainConfig(device=a.device).torch_device()
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, bf16 {a.bf16}")  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        cfg = SyntheticConfig(n_users=a.users, events_per_user=a.events, n_items=5000, days=60)
        src, schema = generate_source(cfg)
        ds = prepare(src, schema, Path(d) / "ds", SplitSpec(train=0.9, valid=0.05, test=0.05), progress=False)
        ds.load_into_memory()
        layout, index = FeatureLayout.from_dataset(ds), history_index(ds)
        train_rows = ds.rows("train")
        late = train_rows[len(train_rows) // 2 :]  # requests with long histories
        print(f"{ds.n_rows:,} rows; batch {a.batch}\n")
        print("| model | L | train samples/s | score P50 ms | score P99 ms |\n|---|---|---|---|---|")
        for name in a.models.split(","):
            for length in (int(x) for x in a.lengths.split(",")):
                torch.manual_seed(0)
                model = build_model(name, layout, **PARAMS.get(name, {})).to(device)
                opt = torch.optim.Adam(model.parameters(), 1e-3)
                loader = BatchLoader(ds, late, a.batch, hist_len=length, shuffle=True, index=index, layout=layout,
                                     history_samples=model.reads_history_samples)  # fmt: skip
                it = iter(loader)
                model.train()
                n, t0 = 0, 0.0
                for step in range(a.steps + 2):
                    if step == 2:  # two warm-up steps (kernels, allocator)
                        _sync(device)
                        t0, n = time.perf_counter(), 0
                    batch = next(it).to(device)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16):
                        out = model(batch)
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits.float(), batch.labels)
                    loss = loss + sum(out.aux_losses.values(), torch.zeros((), device=device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    n += len(batch)
                _sync(device)
                train_sps = n / (time.perf_counter() - t0)
                tokens = None
                if name == "sif":  # scored from exported codes, as deployed
                    model.cpu()
                    codes = export_codes(model, ds, Path(d) / f"codes-{length}", progress=False).load_into_memory()
                    model.to(device)
                    tokens = TokenSource(codes, length, dequantize=False)
                scorer = BatchLoader(ds, late, 1, hist_len=length, index=index, layout=layout, tokens=tokens,
                                     history_samples=model.reads_history_samples and tokens is None)  # fmt: skip
                picks = np.random.default_rng(0).choice(late, a.requests)
                model.eval()
                lat = []
                with torch.no_grad():
                    for r in picks:
                        t1 = time.perf_counter()
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16):
                            model(scorer.build(np.array([r])).to(device))
                        _sync(device)
                        lat.append(time.perf_counter() - t1)
                ms = np.array(lat[5:]) * 1e3
                print(f"| {name} | {length} | {train_sps:,.0f} | {np.percentile(ms, 50):.1f} | "
                      f"{np.percentile(ms, 99):.1f} |", flush=True)  # fmt: skip
    if a.encode_rows:
        _encode_kernels(device, a.encode_rows)


def _encode_kernels(device: torch.device, rows: int) -> None:
    """Samples/s of HGAQ encoding through each nearest-code kernel, and whether its codes equal the
    reference's (the reference materializes every distance, so it runs on a slice of 4,096 rows)."""
    from sampletok.tokenizers.hgaq import HGAQConfig, ResidualVQ

    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(9, 3, 256, 16, generator=g)
    x = torch.randn(rows, 9, 16, generator=g).to(device)
    ref = None
    print(f"\nHGAQ encode on {device}, {rows:,} rows, T = 9, M = 3, V = 256, d0 = 16")
    print("| kernel | samples/s | codes equal to the reference |\n|---|---|---|")
    for kernel in ("reference", "packed", "matmul", "auto"):
        vq = ResidualVQ(9, HGAQConfig(levels=3, codes=256, d0=16, kernel=kernel)).to(device)
        vq.codebook.copy_(codebook)
        xs = x[:4096] if kernel == "reference" else x
        vq.encode(xs[:1024])  # warm-up
        _sync(device)
        t = time.perf_counter()
        codes = vq.encode(xs)
        _sync(device)
        sps = len(xs) / (time.perf_counter() - t)
        head = codes[:4096].cpu()
        ref = head if ref is None else ref
        print(f"| {kernel} | {sps:,.0f} | {(head == ref).all(-1).float().mean():.2%} |", flush=True)


if __name__ == "__main__":
    main()
