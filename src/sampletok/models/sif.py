"""SIF (Sample Is Feature): every history row is a whole raw sample, quantized by HGAQ into T × M codes;
the SIF-Mixer mixes the (L+1) × T grid at token level and at sample level.

Input grid ``(L+1) × T × width``: row 0 is the current request through the alignment projection
``R (P x)`` (never quantized), rows 1..L are the user's history samples strictly before the request, as
decoded code sums (quantized on the fly during joint training, read from a token store of exported codes
when ``store`` is given), plus a recency encoding; padded rows are masked out of sample-level attention, so
they never influence the target. Loss: BCE + ``vq_weight`` · (commitment + entropy) + ``align_weight`` ·
``||R x − sg(RVQ(P x))||²`` + the tokenizer's auxiliary label loss.

Model width: the sub-tokens (d0 = 16) are projected up to ``width`` (default 32) before mixing, so 4 heads
have 8 dimensions each (8 heads on d0 = 16 would leave 2-dim heads).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from sampletok.data.batches import Batch, BatchLoader, FeatureLayout, history_index
from sampletok.errors import ConfigError, validated
from sampletok.models.base import ModelOutput, RankingModel, register
from sampletok.nn import MLP, ResponseEncoder
from sampletok.nn.layers import MultiHeadAttention, RecencyEncoding, key_padding_mask
from sampletok.store import LocalTokenStore
from sampletok.tokenizers.hgaq import HGAQConfig, SampleTokenizer


class MixerBlock(nn.Module):
    """Pre-LN residual: attention across sub-tokens in each row, across rows at each sub-token, then FFN."""

    def __init__(self, width: int, heads: int, ffn_mult: int = 4):
        super().__init__()
        self.n1, self.n2, self.n3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.token_attn = MultiHeadAttention(width, heads)
        self.sample_attn = MultiHeadAttention(width, heads)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width))

    def forward(self, x: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
        b, r, t, d = x.shape
        flat = x.reshape(b * r, t, d)
        flat = flat + self.token_attn(self.n1(flat))
        cols = flat.view(b, r, t, d).transpose(1, 2).reshape(b * t, r, d)
        mask = key_padding_mask(row_mask.repeat_interleave(t, dim=0), r)
        cols = cols + self.sample_attn(self.n2(cols), None, mask)
        x = cols.view(b, t, r, d).transpose(1, 2)
        return x + self.ffn(self.n3(x))


class FlatBlock(nn.Module):
    """Ablation: one attention over all (L+1)·T tokens (cost O((LT)²))."""

    def __init__(self, width: int, heads: int, ffn_mult: int = 4):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width))

    def forward(self, x: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
        b, r, t, d = x.shape
        flat = x.reshape(b, r * t, d)
        mask = key_padding_mask(row_mask.repeat_interleave(t, dim=1), r * t)
        flat = flat + self.attn(self.n1(flat), None, mask)
        flat = flat + self.ffn(self.n2(flat))
        return flat.view(b, r, t, d)


@register("sif")
class SIF(RankingModel):
    history_keep: torch.Tensor | None  # buffer [F] bool: the fields a history row keeps (None: all)

    def __init__(
        self,
        layout: FeatureLayout,
        hgaq: dict[str, Any] | None = None,
        width: int = 32,
        blocks: int = 4,
        heads: int = 4,
        hidden: Sequence[int] = (64,),
        mixer: Literal["factored", "flat", "pool"] = "factored",
        vq_weight: float = 1.0,
        align_weight: float = 0.25,
        store: str | None = None,
        history_responses: bool | list[str] = True,
        history_fields: list[str] | None = None,
        quantize_history: bool = True,
    ):
        super().__init__(layout)
        self.cfg = validated(HGAQConfig, {} if hgaq is None else hgaq, prefix="hgaq.")
        self.tokenizer = SampleTokenizer(layout, self.cfg)
        t, d0 = self.tokenizer.n_tokens, self.cfg.d0
        self.align = nn.Parameter(torch.eye(d0).repeat(t, 1, 1))  # R: one d0×d0 map per sub-token
        self.up = nn.Linear(d0, width)
        self.token_pos = nn.Parameter(torch.zeros(t, width))
        self.target_row = nn.Parameter(torch.zeros(width))
        self.recency = RecencyEncoding(width)
        # a past sample's responses are part of the raw sample: those already known at the request time are
        # added to every sub-token of its row, like the recency encoding
        self.responses = ResponseEncoder(layout, width, history_responses) if history_responses else None
        # ablations: which fields a history row carries (None = all: the whole raw sample), whether history
        # rows are quantized (False = the dense projection P x), and the mixer ("pool" averages each row's
        # sub-tokens into one token before mixing, i.e. sample-level attention only)
        names = layout.field_names
        unknown = sorted(set(history_fields or []) - set(names))
        if unknown:
            raise ConfigError(f"history_fields {unknown} are not fields of the schema ({names})")
        self.register_buffer(
            "history_keep", None if history_fields is None else torch.tensor([n in history_fields for n in names])
        )
        self.quantize_history, self.mixer = quantize_history, mixer
        block = FlatBlock if mixer == "flat" else MixerBlock
        self.blocks = nn.ModuleList(block(width, heads) for _ in range(blocks))
        self.head = MLP(width, list(hidden), out_dim=self.n_tasks)
        self.vq_weight, self.align_weight, self.store_path = vq_weight, align_weight, store
        self._rows: BatchLoader | None = None
        self.store: LocalTokenStore | None = None

    def prepare_data(self, ds, *, seed: int, run_dir=None, progress: bool = True, build: bool = True) -> None:
        # history rows are whole raw samples: a loader that gathers any row's features (no nested history)
        self._rows = BatchLoader(ds, np.zeros(0, np.int64), hist_len=0, index=history_index(ds))
        if self.store_path:
            self.store = LocalTokenStore.open(self.store_path).load_into_memory()
            if self.store.meta.get("kind") != "sif" or self.store.meta.get("dataset") != ds.fingerprint:
                raise ConfigError(f"{self.store_path}: not a SIF code store of dataset {ds.fingerprint}")

    def data_producer(self) -> str | None:
        return self.store.meta["producer"] if self.store is not None else None

    def use_store(self, store: LocalTokenStore) -> None:
        """Read history codes from ``store`` (refused unless its codebook is this model's)."""
        self.tokenizer.decode(
            np.zeros((1, self.tokenizer.n_tokens, self.cfg.levels), np.uint8),
            version=store.meta.get("codebook_version"),
        )
        self.store = store

    def _history(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
        """[B, L, T, d0] history sub-tokens, ([B, L, R] responses, [B, L, R] known) (+ VQ losses when the
        history is quantized on the fly)."""
        b, l = batch.hist_rows.shape
        t, d0 = self.tokenizer.n_tokens, self.cfg.d0
        out = torch.zeros(b, l, t, d0)
        mask = batch.hist_mask
        labels = (batch.hist_responses, batch.hist_response_mask)
        if not mask.any():
            return out, labels, {}
        if self.store is not None:
            if not self.quantize_history:
                raise ConfigError("a dense-history SIF (quantize_history: false) cannot read codes from a store")
            f = self.store.fetch(batch.user.numpy(), batch.ts.numpy(), l, dequantize=False)
            if not np.array_equal(f.mask, mask.numpy()):
                raise ConfigError("the code store does not hold the same history rows as the dataset")
            out[mask] = self.tokenizer.decode(f.payload[f.mask], version=self.store.meta.get("codebook_version"))
            labels = (torch.from_numpy(f.side), torch.from_numpy(f.side_mask))
            return out, labels, {}
        if self._rows is None:
            raise ConfigError("SIF model needs prepare_data(ds, seed=...) before use")
        rows = batch.hist_rows[mask].numpy()
        uniq, inverse = np.unique(rows, return_inverse=True)
        if self.quantize_history:
            q, _, losses = self.tokenizer(self._rows.build(uniq), self.history_keep)
        else:
            q, losses = self.tokenizer.project(self._rows.build(uniq), self.history_keep), {}
        out[mask] = q[torch.from_numpy(inverse)]
        return out, labels, losses

    def forward(self, batch: Batch) -> ModelOutput:
        x = self.tokenizer.project(batch)  # [B, T, d0] the request, never quantized here
        target = torch.einsum("btd,tde->bte", x, self.align)
        hist, hist_labels, losses = self._history(batch)
        aux: dict[str, torch.Tensor] = {}
        if self.training:
            q_target, _, vq = self.tokenizer.rvq(x)
            aux["align"] = self.align_weight * (target - q_target.detach()).pow(2).mean()
            for k, v in vq.items():
                losses[k] = losses.get(k, 0) + v
            aux.update({f"vq_{k}": self.vq_weight * v for k, v in losses.items() if k != "aux_label"})
            if "aux_label" in losses:
                aux["aux_label"] = losses["aux_label"]
        grid = torch.cat([target.unsqueeze(1), hist], dim=1)  # [B, L+1, T, d0]
        h = self.up(grid) + self.token_pos
        rec = self.recency(batch.hist_gap, batch.hist_mask)  # [B, L, width]
        if self.responses is not None:
            rec = rec + self.responses(*hist_labels) * batch.hist_mask.unsqueeze(-1)
        h = h + torch.cat([self.target_row.expand(len(batch), 1, -1), rec], dim=1).unsqueeze(2)
        row_mask = torch.cat([batch.hist_mask.new_ones(len(batch), 1), batch.hist_mask], dim=1)
        if self.mixer == "pool":
            h = h.mean(2, keepdim=True)  # [B, L+1, 1, width]
        for block in self.blocks:
            h = block(h, row_mask)
        return ModelOutput(self.head(h[:, 0].mean(1)), aux)


def export_codes(
    model: SIF, ds, path, batch_size: int = 8192, progress: bool = True, workers: int | None = 1
) -> LocalTokenStore:
    """Frozen export: every instance's codes [T, M] (+ labels and availability) into a token store.

    ``workers=1`` (default) encodes batch after batch with torch's intra-op threads: the [T, 1024, V] distance
    blocks are large enough to split; on 2 cores 2 worker threads were slower before the lean
    ``ResidualVQ.encode`` (120-152k vs 147-173k samples/s) and equal after it (228k vs 224-238k,
    ``benchmarks/bench_sif.py --sections encode``), unlike the IAT export's small ops."""
    import time

    from sampletok.nn.inference import map_row_batches

    model.eval()
    loader = BatchLoader(ds, np.zeros(0, np.int64), hist_len=0, index=history_index(ds))
    t, m = model.tokenizer.n_tokens, model.cfg.levels
    codes = np.zeros((ds.n_rows, t, m), np.int64)

    def encode(rows: np.ndarray) -> None:
        codes[rows] = model.tokenizer.encode(loader.build(rows), model.history_keep)

    t0 = time.time()
    map_row_batches(encode, ds.n_rows, batch_size, workers, progress, desc="SIF export")
    sec = time.time() - t0
    ts = np.asarray(ds.col("_ts"))
    dtype = "uint8" if model.cfg.codes <= 256 else "uint16"
    store = LocalTokenStore.create(
        path,
        producer=model.tokenizer.rvq.version(),
        payload_shape=(t, m),
        label_names=ds.schema.response_names,
        dtype=dtype,
        overwrite=True,
        extra_meta={
            "kind": "sif",
            "ticks_per_second": ds.schema.ticks_per_second,
            "dataset": ds.fingerprint,
            "codebook_version": model.tokenizer.rvq.version(),
            "hgaq": model.cfg.model_dump(),
            "export_instances_per_s": ds.n_rows / max(sec, 1e-9),
        },
    )
    side = np.stack([np.asarray(ds.response_column(r)) for r in ds.schema.response_names], 1)
    avail = ds.response_available_at()
    store.append(np.asarray(ds.col("_instance_id")), np.asarray(ds.col("_user_key")), ts, codes, side, avail)
    store.commit()
    return store
