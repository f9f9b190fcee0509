"""Scale: a synthetic log of ``--rows`` rows × 24 fields (default 50M) prepared and trained on, each phase in a
process of its own so that each has its own peak memory.

Run: python benchmarks/bench_scale.py --rows 50_000_000 [--steps 100] [--dir runs/bench-scale]
     python benchmarks/bench_scale.py --rows 50_000_000 --skip-prepare --models sif --sif-code-cache-steps 0

Phases: ``prepare`` (generate + the 3 passes; rows/s), then ``train din`` (history 50) and ``train sif``
(history 20): loader, history index and model built from the prepared folder (memory-mapped columns), then
``--steps`` training steps of batch 1024 (samples/s over the timed steps after 3 warm-up steps). Memory per
phase: peak RSS (``ru_maxrss``: every page the process touched, file-backed ones included), the peak of the
private memory (``RssAnon`` sampled every 50 ms: what the process needs) and, at the phase's end, the file
pages it maps (``RssFile``: memory-mapped columns, which the kernel drops under pressure and reads again).
Targets of the scale issue: prepare ≤ 1 GiB, training ≤ 4 GiB at 50M rows on the 24 GiB machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 1024**3


def _rss_kib() -> dict[str, int]:
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: int(v.split()[0]) for k, v in (x.split(":", 1) for x in lines if x.startswith("Rss"))}


class _PeakPrivate:
    """The peak of this process's private memory (RssAnon), sampled every 50 ms by a thread: the kernel keeps
    a peak of the whole RSS only, which counts the file pages of memory-mapped columns too."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_kib = max(self.peak_kib, _rss_kib().get("RssAnon", 0))

    def memory(self) -> dict[str, float]:
        """Peak RSS, peak private memory and the current file-backed RSS, in MiB."""
        self._stop.set()
        self._thread.join()
        kib = _rss_kib()
        return {
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "anon_mib": max(self.peak_kib, kib.get("RssAnon", 0)) / 1024,
            "file_mib": kib.get("RssFile", 0) / 1024,
        }


def _source(rows: int, fields: int):
    from sampletok.data.sources.synthetic import SyntheticConfig, generate_source

    events = 80.0
    cfg = SyntheticConfig(
        n_users=max(1, round(rows / events)), events_per_user=events, n_fields=fields, users_per_chunk=2000
    )
    return generate_source(cfg)


def phase_prepare(a: argparse.Namespace) -> dict:
    from sampletok.data.prepare import prepare

    src, schema = _source(a.rows, a.fields)
    t = time.perf_counter()
    ds = prepare(src, schema, a.dir / "prepared", force=True, progress=True)
    sec = time.perf_counter() - t
    size = sum(p.stat().st_size for p in (a.dir / "prepared" / "columns").glob("*.npy"))
    return {
        "rows": ds.n_rows,
        "seconds": sec,
        "rows_per_s": ds.n_rows / sec,
        "bytes_per_row": size / ds.n_rows,
    }


def phase_train(a: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from sampletok.data.batches import BatchLoader
    from sampletok.data.dataset import PreparedDataset
    from sampletok.features import FeatureLayout
    from sampletok.models import build_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ds = PreparedDataset(a.dir / "prepared")
    layout = FeatureLayout.from_dataset(ds)
    if a.model == "din":
        model, hist_len, samples = build_model("din", layout), 50, False
    else:
        params = {"hgaq": {"fields_per_token": 8}, "width": 32, "blocks": 1, "heads": 4}
        params["code_cache_steps"] = a.sif_code_cache_steps
        model, hist_len, samples = build_model("sif", layout, **params), 20, True
    t = time.perf_counter()
    loader = BatchLoader(ds, ds.rows("train"), 1024, hist_len=hist_len, shuffle=True, history_samples=samples)
    setup = time.perf_counter() - t
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    warmup, n, start = 3, 0, 0.0
    for step, batch in enumerate(loader):
        if step == warmup:
            start, n = time.perf_counter(), 0
        out = model(batch)
        loss = F.binary_cross_entropy_with_logits(out.logits, batch.labels) + sum(out.aux_losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(batch)
        if step + 1 == warmup + a.steps:
            break
    return {
        "model": a.model,
        "history": hist_len,
        "train_rows": len(loader.rows),
        "setup_s": setup,
        "samples_per_s": n / (time.perf_counter() - start),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000_000)
    ap.add_argument("--fields", type=int, default=24)
    ap.add_argument("--steps", type=int, default=100, help="timed training steps per model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("runs/bench-scale"))
    ap.add_argument("--phase", choices=["prepare", "train"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=["din", "sif"], default="din", help=argparse.SUPPRESS)
    ap.add_argument("--skip-prepare", action="store_true", help="reuse the prepared folder under --dir")
    ap.add_argument("--models", default="din,sif", help="training phases to run")
    ap.add_argument("--sif-code-cache-steps", type=int, default=1000, help="SIF's code cache (0: off)")
    a = ap.parse_args()
    if a.phase:  # a child: one phase, its figures as one JSON line
        sampler = _PeakPrivate()
        result = phase_prepare(a) if a.phase == "prepare" else phase_train(a)
        result.update(sampler.memory())
        print("RESULT " + json.dumps(result), flush=True)
        return
    a.dir.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, __file__, "--rows", str(a.rows), "--fields", str(a.fields), "--dir", str(a.dir)]
    base += [
        "--steps",
        str(a.steps),
        "--threads",
        str(a.threads),
        "--sif-code-cache-steps",
        str(a.sif_code_cache_steps),
    ]
    runs = ([] if a.skip_prepare else [["--phase", "prepare"]]) + [
        ["--phase", "train", "--model", m] for m in a.models.split(",")
    ]
    results = []
    for extra in runs:
        proc = subprocess.run(base + extra, stdout=subprocess.PIPE, text=True, check=False)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"phase {' '.join(extra)} failed (exit {proc.returncode})")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    print(f"\n### Scale: {a.rows:,} rows × {a.fields} fields, {a.threads} threads\n")
    print("| phase | rows/s or samples/s | peak RSS (MiB) | peak private (MiB) | file pages at end (MiB) | notes |")
    print("|---|---|---|---|---|---|")
    for r in results:
        mem = f"{r['peak_rss_mib']:,.0f} | {r['anon_mib']:,.0f} | {r['file_mib']:,.0f}"
        if "rows_per_s" in r:
            note = f"{r['rows']:,} rows in {r['seconds']:.0f} s, {r['bytes_per_row']:.0f} bytes/row on disk"
            print(f"| prepare | {r['rows_per_s']:,.0f} rows/s | {mem} | {note} |")
        else:
            note = f"history {r['history']}, {r['train_rows']:,} training rows, loader built in {r['setup_s']:.1f} s"
            if r["model"] == "sif":
                k = a.sif_code_cache_steps
                note += f", code cache {f'every {k} steps' if k else 'off'}"
            print(f"| train {r['model']} | {r['samples_per_s']:,.0f} samples/s | {mem} | {note} |")


if __name__ == "__main__":
    main()
