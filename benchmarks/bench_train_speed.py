"""Training throughput of an experiment's models, in one run on one machine: each model trains ``--batches``
steps (batch building, history fetch, forward, backward, Adam) with the experiment's own parameters, batch
size, history length and training rows, and the table gives samples/s, seconds per epoch of those rows, and the
ratio of each model's epoch time to the ``--ratio-to`` models'.

Run on an otherwise idle machine:
    python benchmarks/bench_train_speed.py configs/experiments/ml100k-sif.yaml --models din,onetrans,sif
    python benchmarks/bench_train_speed.py configs/experiments/synthetic-long-sif.yaml --models din,L1024 --batches 4
Each speed lever can be switched off to measure what it buys: ``--attention-kernel sdpa`` (every attention
through torch SDPA, not the short-sequence kernel), ``--all-rows-last-block`` (SIF's last block computes every
row); and the options ``--bf16`` (autocast) and ``--compile`` (torch.compile) on. ``--repeats`` interleaves the
models that many times and reports the median (the machine's noise is in the spread column).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    from sampletok.nn.attention import KERNELS, use_attention_kernel
    from sampletok.train.experiment import Experiment, load_dataset

    ap = argparse.ArgumentParser()
    ap.add_argument("experiment", type=Path)
    ap.add_argument("--models", default=None, help="comma-separated model labels of the experiment (default: all)")
    ap.add_argument("--batches", type=int, default=20, help="timed training steps per model and repeat")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--ratio-to", default="din,onetrans", help="labels whose epoch time the ratios divide by")
    ap.add_argument("--attention-kernel", choices=KERNELS, default="auto")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast of the forward pass, as train.bf16")
    ap.add_argument(
        "--all-rows-last-block",
        action="store_true",
        help="SIF's last mixer block computes every row, not the target row alone (the lever off)",
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile(dynamic=True) each model's forward")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the experiment's)")
    a = ap.parse_args()

    exp = Experiment.from_yaml(a.experiment)
    specs = {m.display: m for m in exp.models}
    labels = a.models.split(",") if a.models else list(specs)
    unknown = [x for x in labels if x not in specs]
    if unknown:
        raise SystemExit(f"{a.experiment}: no model labelled {', '.join(unknown)} (labels: {', '.join(specs)})")
    torch.set_num_threads(a.threads or exp.train.threads or torch.get_num_threads())
    ds = load_dataset(exp.dataset).load_into_memory()
    benches = {label: _Bench(ds, exp, specs[label], a.bf16, a.compile, a.all_rows_last_block) for label in labels}
    options = "".join(
        f", {o}"
        for o, on in (
            ("bf16 autocast", a.bf16),
            ("torch.compile", a.compile),
            ("SIF last block: all rows", a.all_rows_last_block),
        )
        if on
    )
    print(
        f"{exp.name}: torch {torch.__version__}, {torch.get_num_threads()} threads, attention kernel "
        f"{a.attention_kernel}{options}; {a.batches} steps × {a.repeats}"
    )
    rates: dict[str, list[float]] = {label: [] for label in labels}
    with use_attention_kernel(a.attention_kernel):
        for _ in range(a.repeats):
            for label, bench in benches.items():
                rates[label].append(bench.samples_per_second(a.batches))
    refs = [r for r in a.ratio_to.split(",") if r in rates]
    print(
        "| model | history | batch | train samples/s | spread | s / epoch | "
        + "".join(f"× {r} | " for r in refs)
        + "MFLOPs / sample | params |\n|---|---|---|---|---|---|---|"
        + "---|" * len(refs)
        + "---|"
    )
    median = {label: statistics.median(r) for label, r in rates.items()}
    for label, bench in benches.items():
        sps = median[label]
        spread = f"{min(rates[label]):,.0f}-{max(rates[label]):,.0f}" if a.repeats > 1 else ""
        ratios = "".join(f"{median[r] / sps:.2f} | " for r in refs)
        print(
            f"| {label} | {bench.hist_len} | {bench.batch_size} | {sps:,.0f} | {spread} | "
            f"{bench.n_rows / sps:,.1f} | {ratios}{bench.mflops:,.1f} | {bench.params:,} |",
            flush=True,
        )


class _Bench:
    """One model of the experiment with its optimizer and an endless iterator over its training batches."""

    def __init__(
        self, ds, exp, spec, bf16: bool = False, compiled: bool = False, all_rows_last_block: bool = False
    ) -> None:
        from sampletok.data.batches import BatchLoader, history_index, resolved_hist_len
        from sampletok.features import FeatureLayout
        from sampletok.models import build_model
        from sampletok.train.experiment import recent_rows

        cfg = spec.train_config(exp.train)
        self.bf16 = bf16
        torch.manual_seed(0)
        layout = FeatureLayout.from_dataset(ds)
        self.model = build_model(spec.name, layout, **spec.params)
        self.params = sum(p.numel() for p in self.model.parameters())
        if all_rows_last_block and hasattr(self.model, "target_only_last"):
            self.model.target_only_last = False
        # compiled once here, in the constructor's first step: the compile time is not in samples/s
        self.forward = torch.compile(self.model, dynamic=True) if compiled else self.model
        self.opt = torch.optim.Adam(self.model.parameters(), cfg.lr)
        rows = recent_rows(ds.rows("train"), cfg.train_recent_fraction)
        self.hist_len, self.batch_size, self.n_rows = resolved_hist_len(ds, cfg.hist_len), cfg.batch_size, len(rows)
        self.loader = BatchLoader(
            ds,
            rows,
            cfg.batch_size,
            hist_len=self.hist_len,
            shuffle=True,
            index=history_index(ds),
            layout=layout,
            history_samples=self.model.reads_history_samples,
        )
        self._it = iter(self.loader)
        self._step(self._next())  # the first step initializes SIF's codebooks from data: not a steady state
        self.mflops = self._mflops_per_sample(rows)

    def _mflops_per_sample(self, rows, n: int = 32) -> float:
        """Forward + backward FLOPs of one training step per sample (torch's FLOP counter, attention through
        the reference kernel so that every product is a counted matmul; on the last ``n`` training rows)."""
        from torch.utils.flop_counter import FlopCounterMode

        from sampletok.nn.attention import use_attention_kernel

        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        batch = self.loader.build(rows[-n:])
        with FlopCounterMode(display=False) as counter, use_attention_kernel("reference"):
            out = self.model(batch)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels)
            (loss + sum(out.aux_losses.values(), torch.zeros(()))).backward()
        self.model.load_state_dict(state)  # the EMA codebooks moved
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops() / n / 1e6

    def _next(self):
        batch = next(self._it, None)
        if batch is None:
            self._it = iter(self.loader)
            batch = next(self._it)
        return batch

    def samples_per_second(self, steps: int) -> float:
        self._step(self._next())  # warm-up after the other models ran
        n, t0 = 0, time.perf_counter()
        for _ in range(steps):
            batch = self._next()  # batch building is timed: it is part of every training step
            self._step(batch)
            n += len(batch)
        return n / (time.perf_counter() - t0)

    def _step(self, batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.forward(batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits.float(), batch.labels)
        loss = loss + sum((v.float() for v in out.aux_losses.values()), torch.zeros(()))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


if __name__ == "__main__":
    main()
