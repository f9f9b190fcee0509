"""SIF: HGAQ encode throughput, own residual VQ vs vector-quantize-pytorch, bytes per instance, params and
FLOPs per sample, and P99 latency of scoring one request from the code store at L = 256 and 1000.

Run on an otherwise idle machine:
    python benchmarks/bench_sif.py                      # all sections
    python benchmarks/bench_sif.py --sections encode,vq  # some of them
The library comparison needs ``pip install vector-quantize-pytorch`` (not a sampletok dependency); without it
that row is skipped with a message.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _prepared(tmp: Path, **synthetic):
    from sampletok.data.prepare import prepare
    from sampletok.data.sources.synthetic import SyntheticConfig, generate_source

    src, schema = generate_source(SyntheticConfig(**synthetic))
    return prepare(src, schema, tmp / "syn", progress=False).load_into_memory()


def _rate(fn, n: int, repeat: int = 3) -> float:
    fn()  # warm-up
    best = min(_timed(fn) for _ in range(repeat))
    return n / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_encode(tmp: Path, fields_per_token: int) -> None:
    """Raw sample → codes: batch building + field embeddings + projection + 3-level nearest-code search."""
    from sampletok.data.batches import BatchLoader, history_index
    from sampletok.features import FeatureLayout
    from sampletok.nn.inference import default_workers, map_row_batches
    from sampletok.tokenizers.hgaq import HGAQConfig, SampleTokenizer

    ds = _prepared(tmp, n_users=4000, events_per_user=60, n_fields=24)
    tok = SampleTokenizer(FeatureLayout.from_dataset(ds), HGAQConfig(fields_per_token=fields_per_token)).eval()
    loader = BatchLoader(ds, np.zeros(0, np.int64), hist_len=0, index=history_index(ds))
    n = min(ds.n_rows, 131_072)
    batches = [loader.build(np.arange(i, min(i + 8192, n))) for i in range(0, n, 8192)]
    full = _rate(lambda: [tok.encode(loader.build(np.arange(i, min(i + 8192, n)))) for i in range(0, n, 8192)], n)
    compute = _rate(lambda: [tok.encode(b) for b in batches], n)
    out = np.zeros((n, tok.n_tokens, tok.cfg.levels), np.uint8)

    def encode(rows):
        out[rows] = tok.encode(loader.build(rows))

    workers = default_workers()
    parallel = _rate(lambda: map_row_batches(encode, n, 8192, workers, progress=False), n)
    t, m, v = tok.n_tokens, tok.cfg.levels, tok.cfg.codes
    print(
        f"\n## HGAQ encode ({torch.get_num_threads()} torch threads; T = {t}, M = {m}, V = {v}, d0 = {tok.cfg.d0}, "
        f"{len(ds.schema.features)} fields, batch 8192)\n"
    )
    print("| path | samples/s |\n|---|---|")
    print(f"| raw rows → codes (batch building included) | {full:,.0f} |")
    print(f"| built batch → codes | {compute:,.0f} |")
    print(f"| raw rows → codes, {workers} worker threads × 1 torch thread (the export path) | {parallel:,.0f} |")
    # bytes: codes vs the prepared (encoded ids) row vs the embedded raw sample the mixer would otherwise read
    row_bytes = sum(
        np.asarray(ds.col(c)).dtype.itemsize * int(np.prod(np.asarray(ds.col(c)).shape[1:]))
        for c in ds.manifest["columns"]
        if c.startswith(("cat__", "multi__", "num__"))
    )
    emb_bytes = len(ds.schema.features) * tok.cfg.field_dim * 4
    print(
        f"\nbytes per instance: codes {t * m} (uint8 [T, M]); prepared raw row {row_bytes}; embedded raw sample "
        f"(F × d_e float32) {emb_bytes} → {emb_bytes / (t * m):.0f}× smaller"
    )


def bench_vq(n: int, t: int, levels: int, codes: int, d0: int) -> None:
    """Own batched residual VQ vs vector-quantize-pytorch's GroupedResidualVQ on the same [N, T, d0] input:
    training step (forward + backward, EMA updates) and encoding, plus reconstruction error after training."""
    from sampletok.tokenizers.hgaq import HGAQConfig, ResidualVQ

    torch.manual_seed(0)
    centres = torch.randn(t, 64, d0)

    def data(k):  # clustered sub-token vectors, like projected field embeddings
        return centres[torch.arange(t), torch.randint(0, 64, (k, t))] + 0.3 * torch.randn(k, t, d0)

    x_train, x_test = data(n), data(8192)
    print(
        f"\n## Residual VQ: own vs library (N = {n}, T = {t}, M = {levels}, V = {codes}, d0 = {d0}; "
        f"{torch.get_num_threads()} torch threads)\n"
    )
    print("| implementation | train step samples/s | encode samples/s | relative MSE after 30 steps | modules |")
    print("|---|---|---|---|---|")

    own = ResidualVQ(t, HGAQConfig(levels=levels, codes=codes, d0=d0, entropy_weight=0.0))

    def own_step(x):
        own.train()
        xx = x.clone().requires_grad_(True)
        q, _, losses = own(xx)
        (q.sum() * 0 + losses["commit"]).backward()

    def own_encode(x):
        own.eval()
        return own.decode(own.encode(x))  # codes → vectors, as the library's call returns

    _report(
        "sampletok ResidualVQ (batched over T)", own_step, own_encode, x_train, x_test, sum(1 for _ in own.modules())
    )
    try:
        from vector_quantize_pytorch import GroupedResidualVQ
    except ImportError:
        print("| vector-quantize-pytorch | not installed (pip install vector-quantize-pytorch) | | | |")
        return
    lib = GroupedResidualVQ(
        dim=t * d0,
        groups=t,
        num_quantizers=levels,
        codebook_size=codes,
        decay=0.99,
        commitment_weight=0.25,
        kmeans_init=True,
        kmeans_iters=1,
        threshold_ema_dead_code=2,
    )

    def lib_step(x):
        lib.train()
        xx = x.reshape(1, len(x), t * d0).clone().requires_grad_(True)
        q, _, loss = lib(xx)
        (q.sum() * 0 + loss.sum()).backward()

    def lib_encode(x):
        lib.eval()
        with torch.no_grad():
            return lib(x.reshape(1, len(x), t * d0))[0].reshape(len(x), t, d0)

    _report(
        "vector-quantize-pytorch GroupedResidualVQ",
        lib_step,
        lib_encode,
        x_train,
        x_test,
        sum(1 for _ in lib.modules()),
    )


def _report(name, step, encode, x_train, x_test, modules: int) -> None:
    bs = 8192
    chunks = [x_train[i : i + bs] for i in range(0, len(x_train), bs)]
    step(chunks[0])  # data-dependent initialization
    t0 = time.perf_counter()
    for i in range(30):
        step(chunks[i % len(chunks)])
    train_rate = 30 * bs / (time.perf_counter() - t0)
    enc_rate = _rate(lambda: encode(x_test), len(x_test))
    rel = float((encode(x_test) - x_test).pow(2).sum() / x_test.pow(2).sum())
    print(f"| {name} | {train_rate:,.0f} | {enc_rate:,.0f} | {rel:.4f} | {modules} |")


def bench_model(tmp: Path, lengths: list[int], requests: int) -> None:
    """Params, FLOPs per sample, and the latency of scoring one request: history rows fetched from the
    code store (CSR lookup + gather), decoded, mixed; eval mode, one request at a time."""
    from torch.utils.flop_counter import FlopCounterMode

    from sampletok.data.batches import BatchLoader, TokenSource, history_index
    from sampletok.features import FeatureLayout
    from sampletok.models import build_model
    from sampletok.tokens.sif import export_codes

    ds = _prepared(tmp, n_users=48, events_per_user=2000, n_fields=24, days=400)
    layout = FeatureLayout.from_dataset(ds)
    index = history_index(ds)
    counts = np.bincount(np.asarray(ds.col("_user_key")))
    print(
        f"\n## SIF-Mixer cost ({torch.get_num_threads()} torch threads; synthetic log of {ds.n_rows:,} rows, "
        f"24 fields; latency over {requests} single requests whose users have ≥ L earlier samples)\n"
    )
    print("| model | L | params | MFLOPs / sample | P50 ms | P99 ms |\n|---|---|---|---|---|---|")
    for name, params in (
        ("sif", {"hgaq": {"fields_per_token": 4}, "width": 32, "blocks": 4, "heads": 4}),
        ("onetrans", {}),
        ("din", {}),
    ):
        torch.manual_seed(0)
        model = build_model(name, layout, **params)
        codes = None
        if name == "sif":  # served from exported codes, as deployed
            codes = export_codes(model, ds, tmp / "codes", progress=False).load_into_memory()
        model.eval()
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for L in lengths:
            tokens = TokenSource(codes, L, dequantize=False) if codes is not None else None
            loader = BatchLoader(ds, np.zeros(0, np.int64), hist_len=L, index=index, layout=layout, tokens=tokens)
            # requests late enough that the user has at least L earlier samples
            user, ts = np.asarray(ds.col("_user_key")), np.asarray(ds.col("_ts"))
            rank = np.empty(ds.n_rows, np.int64)
            order = np.lexsort((ts, user))
            rank[order] = np.arange(ds.n_rows) - np.repeat(np.cumsum(counts) - counts, counts)
            eligible = np.flatnonzero(rank >= L)
            if len(eligible) == 0:
                print(f"| {name} | {L} | no user with {L} samples | | | |")
                continue
            picks = np.random.default_rng(0).choice(eligible, requests)
            with torch.no_grad():
                many = loader.build(picks[:64])
                with FlopCounterMode(display=False) as fc:
                    model(many)
                flops = fc.get_total_flops() / 64
                lat = []
                for r in picks:
                    t0 = time.perf_counter()
                    model(loader.build(np.array([r])))
                    lat.append(time.perf_counter() - t0)
            lat_ms = np.array(lat[5:]) * 1e3
            print(
                f"| {name} | {L} | {n_params:,} | {flops / 1e6:.1f} | {np.percentile(lat_ms, 50):.1f} | "
                f"{np.percentile(lat_ms, 99):.1f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="encode,vq,model")
    ap.add_argument("--fields-per-token", type=int, default=4, help="B (T = 8 on the 24-field synthetic log)")
    ap.add_argument("--vq-samples", type=int, default=65_536)
    ap.add_argument("--lengths", default="256,1000")
    ap.add_argument("--requests", type=int, default=200)
    a = ap.parse_args()
    sections = set(a.sections.split(","))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "encode" in sections:
            bench_encode(tmp, a.fields_per_token)
        if "vq" in sections:
            bench_vq(a.vq_samples, 8, 3, 256, 16)
        if "model" in sections:
            bench_model(tmp, [int(x) for x in a.lengths.split(",")], a.requests)


if __name__ == "__main__":
    main()
