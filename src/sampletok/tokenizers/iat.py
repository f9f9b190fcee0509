"""IAT stage I's network: the source model that compresses every instance into one embedding (InsEmb), and
its config. Training it and exporting its tokens is the tokens layer's job (:mod:`sampletok.tokens.iat`).

A source model reads *all* fields of an instance (and the instance's own short behaviour sequence), builds a
wide hidden vector ``h``, compresses it ``z = tanh(W h + b)`` (default 64-d, the stored InsEmb), decompresses
it and predicts the instance's own label. Schemes:

* ``temporal``: instances one by one in global time order (plain streaming training).
* ``user``: batches of user windows (time-sorted runs of one user's instances); a causal Source Instance
  Transformer (SIT) runs over the window's z's and each position predicts its own label. ``two_pass`` trains
  a second pass over the same windows in reverse time order (our reading of the paper's "forward then
  reverse"). The **pre-SIT** z is exported by default (``export: post_sit`` is the ablation).
* ``user_stream``: rows in global time order; the user's previous T-1 embeddings are read from the already
  written rows (gradients stopped) and only the current instance is updated, as a production stream would.

``z`` reads only the instance's own features and its own past rows (never a label).
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sampletok.features import Batch, FeatureLayout
from sampletok.nn import MLP, FeatureEmbedding, TargetAttention, TransformerBlock


class IATSourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    scheme: Literal["temporal", "user", "user_stream"] = "user"
    emb_dim: int = Field(64, ge=1, description="InsEmb width (the stored token)")
    embed_dim: int = Field(16, ge=1)
    hidden: list[int] = Field(default_factory=lambda: [512, 256], description="trunk; last = width of h")
    decompress: list[int] = Field(default_factory=lambda: [128])
    sit_layers: int = Field(2, ge=1)
    sit_heads: int = Field(2, ge=1)
    window: int = Field(64, ge=2, description="user-order: instances per user window")
    hist_len: int | None = Field(
        None,
        ge=0,
        description="length of the instance's own short behaviour sequence (None: the schema's sequence max_len)",
    )
    stream_context: int = Field(63, ge=1, description="user_stream: previous embeddings read (T-1)")
    two_pass: bool = False
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(1024, ge=1, description="instances per step")
    lr: float = 1e-3
    export: Literal["pre_sit", "post_sit"] = "pre_sit"
    export_order: Literal["causal", "in_sample"] = Field(
        "causal",
        description="causal: fold k's tokens from the state trained on folds < k; in_sample: one model "
        "trained on the whole training window embeds every instance (leaks later labels into training tokens)",
    )
    folds: int = Field(8, ge=2, description="causal export: time folds of the training window")
    dtype: Literal["float16", "float32", "int8"] = "float16"
    rows_where: dict[str, list] | None = Field(
        None,
        description="train on / export only instances whose fields "
        "take these values (e.g. a source domain for transfer)",
    )

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:12]


class SourceModel(nn.Module):
    """Ranking trunk over all fields → bottleneck z → decompress → head; optional causal SIT over z's."""

    def __init__(self, layout: FeatureLayout, cfg: IATSourceConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = FeatureEmbedding(layout, cfg.embed_dim)
        self.has_seq = bool(layout.seq_cat or layout.seq_multi)
        seq_dim = self.embed.seq_dim if self.has_seq else 0
        self.attention = TargetAttention(seq_dim) if self.has_seq else None
        self.trunk = MLP(self.embed.n_tokens * cfg.embed_dim + seq_dim, list(cfg.hidden))
        self.bottleneck = nn.Linear(self.trunk.out_dim, cfg.emb_dim)
        self.decomp = MLP(cfg.emb_dim, list(cfg.decompress))
        self.sit = nn.ModuleList(TransformerBlock(cfg.emb_dim, cfg.sit_heads) for _ in range(cfg.sit_layers))
        self.use_sit = cfg.scheme != "temporal"
        n_tasks = len(layout.task_labels)
        self.head = nn.Linear(self.decomp.out_dim + (cfg.emb_dim if self.use_sit else 0), n_tasks)

    def compress(self, batch: Batch) -> torch.Tensor:
        """[B, emb_dim] InsEmb of each instance in the batch."""
        x = self.embed(batch).flatten(1)
        if self.attention is not None:  # the schema has a behaviour sequence
            interest = self.attention(self.embed.target_item(batch), self.embed.history(batch), batch.hist_mask)
            x = torch.cat([x, interest], dim=1)
        return torch.tanh(self.bottleneck(self.trunk(x)))

    def run_sit(self, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Causal SIT over [B, S, d] z's (valid [B, S]); position t sees positions <= t only."""
        s = z.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=z.device).tril()
        mask = causal.unsqueeze(0) & valid.unsqueeze(1)
        mask = mask | torch.eye(s, dtype=torch.bool, device=z.device)  # never an empty row
        x = z
        for block in self.sit:
            x = block(x, mask)
        return x

    def predict(self, z: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        parts = [self.decomp(z)]
        if self.use_sit:
            parts.append(context if context is not None else torch.zeros_like(z))
        return self.head(torch.cat(parts, dim=-1))

    def sit_last(self, prev_z: torch.Tensor, prev_mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Streaming form: SIT output of the current instance given the previous embeddings (no grad)."""
        seq = torch.cat([prev_z.detach(), z.unsqueeze(1)], dim=1)
        valid = torch.cat([prev_mask, prev_mask.new_ones(len(z), 1)], dim=1)
        return self.run_sit(seq, valid)[:, -1]
