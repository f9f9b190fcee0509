"""Where SIF's training time goes: torch.profiler over training steps, split into batch building, quantizing
the history rows, the request's projection and quantization, the mixer's attention and FFN, the rest of the
forward, the backward pass and the optimizer step.

Each part is a ``record_function`` range (forward hooks on the tokenizer and on every mixer block's attention
and FFN modules, ranges around batch building, backward and the optimizer); the table gives each range's CPU
time and its share of the profiled steps' wall time. The backward of each part is counted in "backward".

Run: python benchmarks/profile_sif.py --data ../shared/data/ml-100k --hist-len 20 [--steps 0 = one epoch]
     python benchmarks/profile_sif.py --data ../shared/data/ml-100k --hist-len 1024 --steps 5 --batch-size 256
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

PARTS = [
    "batch building",
    "history quantization",
    "request quantization (training)",
    "mixer attention",
    "mixer FFN",
    "backward",
    "optimizer",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/ml-100k")
    ap.add_argument("--hist-len", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=0, help="training steps to profile (0: one epoch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=2, help="mixer blocks N")
    ap.add_argument("--fields-per-token", type=int, default=4, help="HGAQ's B")
    ap.add_argument("--code-cache-steps", type=int, default=0, help="SIF's code cache (0: off)")
    ap.add_argument("--prepared", default="runs/profile-sif/prepared")
    a = ap.parse_args()

    from sampletok.data.batches import BatchLoader
    from sampletok.features import FeatureLayout
    from sampletok.models import build_model
    from sampletok.train.experiment import DatasetConfig, load_dataset

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ds = load_dataset(DatasetConfig(kind="movielens", path=a.data, prepared_dir=a.prepared)).load_into_memory()
    model = build_model(
        "sif",
        FeatureLayout.from_dataset(ds),
        hgaq={"fields_per_token": a.fields_per_token},
        width=32,
        blocks=a.blocks,
        code_cache_steps=a.code_cache_steps,
        heads=4,
    )
    loader = BatchLoader(ds, ds.rows("train"), a.batch_size, hist_len=a.hist_len, shuffle=True, history_samples=True)
    steps = a.steps or len(loader)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    _hook(model)
    cached = model._cached_history

    def cached_history(samples):  # the code cache's refreshes count as history quantization
        with record_function("history quantization"):
            return cached(samples)

    model._cached_history = cached_history
    model.train()
    it = iter(loader)
    next(it)  # the first batch initializes the codebooks from data: not a steady-state step
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps - 1):
            with record_function("batch building"):
                try:
                    batch = next(it)
                except StopIteration:
                    break
            out = model(batch)
            loss = F.binary_cross_entropy_with_logits(out.logits, batch.labels) + sum(out.aux_losses.values())
            opt.zero_grad()
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                opt.step()
        wall = time.perf_counter() - t0
    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in PARTS}
    print(
        f"\n### SIF training, ml-100k, L = {a.hist_len}, batch {a.batch_size}, {steps - 1} steps, {a.threads} threads"
    )
    print(f"wall {wall:.1f} s ({(steps - 1) * a.batch_size / wall:.0f} train samples/s)\n")
    print("| part | CPU s | share of wall |\n|---|---|---|")
    named = 0.0
    for p in PARTS:
        s = totals.get(p, 0.0)
        named += s
        print(f"| {p} | {s:.2f} | {s / wall:.0%} |")
    rest = max(wall - named, 0.0)
    print(f"| rest of the forward (embeddings, grid, losses) | {rest:.2f} | {rest / wall:.0%} |")


def _hook(model) -> None:
    """record_function ranges around the tokenizer's calls and each mixer block's attention and FFN."""
    from sampletok.models.sif import MixerBlock

    state = {"history": False}

    def around(module, label, on_enter=None, on_exit=None):
        def pre(mod, args):
            name = label(args)
            mod._rf = record_function(name) if name else None
            if mod._rf is not None:
                mod._rf.__enter__()
            if on_enter:
                on_enter(args)

        def post(mod, args, out):
            if mod._rf is not None:
                mod._rf.__exit__(None, None, None)
            if on_exit:
                on_exit()

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def enter_history(args):
        state["history"] = True

    def exit_history():
        state["history"] = False

    # the tokenizer's forward quantizes the history samples (its residual VQ is nested in that range); the
    # residual VQ called on its own quantizes the request (training only: the alignment loss)
    around(model.tokenizer, lambda args: "history quantization", enter_history, exit_history)
    around(model.tokenizer.rvq, lambda args: None if state["history"] else "request quantization (training)")
    for block in model.blocks:
        if isinstance(block, MixerBlock):
            around(block.token_attn, lambda args: "mixer attention")
            around(block.sample_attn, lambda args: "mixer attention")
            around(block.ffn, lambda args: "mixer FFN")


def _is_history(batch) -> bool:
    return getattr(batch, "hist_rows", None) is not None and batch.hist_rows.shape[1] == 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
