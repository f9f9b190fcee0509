"""Codebook utilization of a trained HGAQ tokenizer: perplexity of code usage and dead codes per
(sub-token, level), as a JSON file and a plot.

Example::

    >>> import numpy as np, tempfile
    >>> from pathlib import Path
    >>> codes = np.random.default_rng(0).integers(0, 16, (1000, 3, 2))   # [N, T, M]
    >>> u = codebook_utilization(codes, n_codes=16)
    >>> u["perplexity"].shape, bool((u["dead_codes"] == 0).all())
    ((3, 2), True)
    >>> write_codebook_report(codes, 16, Path(tempfile.mkdtemp()))["mean_perplexity"] > 15
    True
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def codebook_utilization(codes: np.ndarray, n_codes: int, sizes: list[int] | None = None) -> dict[str, np.ndarray]:
    """codes [N, T, M] → perplexity [T, M] (exp of the usage entropy; n_codes = uniform use) and the number of
    codes never used [T, M] among each sub-token's ``sizes`` (default n_codes each: ``hgaq.codebook_sizes``).
    One bincount over (sub-token, level, code) ids, no per-codebook loop."""
    n, t, m = codes.shape
    cell = (np.arange(t)[:, None] * m + np.arange(m)[None, :])[None]  # [1, T, M] codebook id
    counts = np.bincount((cell * n_codes + codes.astype(np.int64)).ravel(), minlength=t * m * n_codes)
    counts = counts.reshape(t, m, n_codes).astype(np.float64)
    p = counts / np.maximum(counts.sum(-1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    size = np.full(t, n_codes) if sizes is None else np.asarray(sizes)
    if size.shape != (t,):
        raise ValueError(f"codebook sizes {list(size)}: need one per sub-token ({t})")
    in_size = np.arange(n_codes)[None, None, :] < size[:, None, None]
    return {"perplexity": np.exp(entropy), "dead_codes": ((counts == 0) & in_size).sum(-1)}


def write_codebook_report(
    codes: np.ndarray,
    n_codes: int,
    out_dir: Path,
    sub_tokens: list[list[str]] | None = None,
    sizes: list[int] | None = None,
) -> dict:
    """Write ``codebooks.json`` and ``codebooks.png`` (perplexity and dead codes per sub-token and level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    u = codebook_utilization(codes, n_codes, sizes)
    t, m = u["perplexity"].shape
    sizes = [n_codes] * t if sizes is None else [int(x) for x in sizes]
    summary = {
        "n_codes": n_codes,
        "n_samples": int(len(codes)),
        "perplexity": u["perplexity"].round(2).tolist(),
        "dead_codes": u["dead_codes"].tolist(),
        "mean_perplexity": float(u["perplexity"].mean()),
        "dead_fraction": float(u["dead_codes"].sum() / (m * sum(sizes))),
        "sub_tokens": sub_tokens,
        "codebook_sizes": list(sizes),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "codebooks.json").write_text(json.dumps(summary, indent=1))
    labels = [f"{i}: {', '.join(s)[:28]}" if sub_tokens else str(i) for i, s in enumerate(sub_tokens or [[]] * t)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.2 + 0.45 * t))
    for ax, key, title, vmax in (
        (axes[0], "perplexity", f"perplexity (max {n_codes})", n_codes),
        (axes[1], "dead_codes", "unused codes", n_codes),
    ):
        im = ax.imshow(u[key], aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        for (i, j), v in np.ndenumerate(u[key]):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < vmax / 2 else "k", fontsize=8)
        ax.set_xticks(range(m), [f"level {j + 1}" for j in range(m)])
        ax.set_yticks(range(t), labels, fontsize=7)
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"HGAQ codebook utilization over {len(codes):,} samples")
    fig.tight_layout()
    fig.savefig(out_dir / "codebooks.png", dpi=110)
    plt.close(fig)
    return summary
