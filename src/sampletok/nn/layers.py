"""Building blocks. Attention always goes through :func:`sampletok.nn.attention.attend` (SDPA, or a short-sequence
kernel on CPU)."""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from sampletok.errors import ConfigError
from sampletok.nn.attention import attend


class SwishLayerNorm(nn.Module):
    """``x · sigmoid(LayerNorm(x))`` (affine LayerNorm over the last axis): the activation of DLRM-v3's MLPs
    (meta-recsys/generative-recommenders ``ops/pytorch/pt_layer_norm.py``, ``pytorch_swish_layer_norm``).
    Pass the class as an :class:`MLP` ``activation``: it is built with the layer's width.

    Example:
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(SwishLayerNorm(4)(x), x * torch.sigmoid(F.layer_norm(x, (4,))))
        True
    """

    takes_width = True  # MLP builds it as SwishLayerNorm(width)

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.norm(x))


class MLP(nn.Sequential):
    """Linear → activation → dropout stacks; ``out_dim`` adds a final linear layer without activation. An
    activation class with ``takes_width`` (:class:`SwishLayerNorm`) is built with the layer's width."""

    def __init__(
        self,
        in_dim: int,
        hidden: list[int],
        out_dim: int | None = None,
        dropout: float = 0.0,
        activation: type[nn.Module] = nn.ReLU,
        batch_norm: bool = False,
    ):
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(activation(h) if getattr(activation, "takes_width", False) else activation())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
            d = out_dim
        super().__init__(*layers)
        self.out_dim = d


class TargetAttention(nn.Module):
    """DIN's activation unit: weights w(q, k) = MLP([q, k, q-k, q*k]), un-normalized weighted sum of values.

    ``pooling="mean"`` divides that sum by the request's number of valid history rows, so the pooled vector's
    scale no longer grows with the history length (DIN's paper keeps the sum to preserve interest intensity).

    Fast path: the first linear layer is split by input block, W·[q, k, q−k, q∘k] = (W_q+W_d)q +
    (W_k − W_d + W_p·diag(q))k, so the query part is computed once per request, the key part is one batched
    matmul with a per-request [d, h] weight, and neither the [B, n, 4d] concatenation nor q∘k is built (3×
    fewer passes over [B, n, h] activations). ``forward_reference`` is the literal formula (tests compare them).
    """

    def __init__(self, dim: int, hidden: list[int] | None = None, pooling: Literal["sum", "mean"] = "sum"):
        super().__init__()
        if pooling not in ("sum", "mean"):
            raise ConfigError(f"attention pooling must be 'sum' or 'mean', got '{pooling}'")
        self.dim, self.pooling = dim, pooling
        self.score = MLP(4 * dim, hidden or [64, 32], out_dim=1, activation=nn.Sigmoid)

    def _pool(self, w: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked weights w [B, n] · keys [B, n, d] → [B, d]: their sum, or that sum over the valid rows."""
        pooled = torch.einsum("bn,bnd->bd", w, keys)
        if self.pooling == "mean":
            pooled = pooled / mask.sum(1, keepdim=True).clamp(min=1).to(pooled.dtype)
        return pooled

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query [B, d], keys [B, n, d], mask [B, n] → [B, d]."""
        first = cast(nn.Linear, self.score[0])
        wq, wk, wd, wp = first.weight.split(self.dim, dim=1)  # each [h, d]
        per_request = (wk - wd).t() + query.unsqueeze(-1) * wp.t()  # [B, d, h]
        h = torch.baddbmm(F.linear(query, wq + wd, first.bias).unsqueeze(1), keys, per_request)  # [B, n, h]
        for layer in list(self.score)[1:]:
            # in place: h is a fresh [B, n, h] buffer that no backward needs (sigmoid's backward uses its output)
            h = h.sigmoid_() if isinstance(layer, nn.Sigmoid) else layer(h)
        w = h.squeeze(-1) * mask.to(keys.dtype)
        return self._pool(w, keys, mask)

    def forward_grouped(
        self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, group: torch.Tensor
    ) -> torch.Tensor:
        """query [B, d]; row i attends to ``keys[group[i]]`` ([G, n, d], mask [G, n]; ``group`` [B] contiguous,
        numbered from 0) → [B, d]: :meth:`forward` over the keys spread to every row, one group (a served
        request's candidates) at a time over a view of its one history. The work is per (row, key) either way;
        copying each history to its rows and running one [B, n, h] pass instead was slower per request at 2-8
        requests of 100 candidates, L = 256, in an ad-hoc timing on the 2-core development CPU (its working set
        leaves the cache); ``benchmarks/profile_serve.py --groups 1,2,4,8`` times the served forward with it."""
        sizes = torch.bincount(group, minlength=keys.shape[0]).tolist()
        out, start = [], 0
        for g, size in enumerate(sizes):  # one step per request, not per row
            rows = slice(start, start + size)
            out.append(self(query[rows], keys[g : g + 1].expand(size, -1, -1), mask[g : g + 1].expand(size, -1)))
            start += size
        return torch.cat(out)

    def forward_reference(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = query.unsqueeze(1).expand_as(keys)
        w = self.score(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)
        w = w * mask.to(w.dtype)
        return self._pool(w, keys, mask)


class MultiHeadAttention(nn.Module):
    """Multi-head attention over :func:`~sampletok.nn.attention.attend`. ``attn_mask`` is boolean, True = may
    attend (broadcast to [B, H, Lq, Lk]); a ``context`` (and mask) of batch 1 serves every row of ``x``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ConfigError(f"attention width {dim} is not divisible by heads {heads}: change the heads (or width)")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = x if context is None else context
        b, lq, d = x.shape
        lk = context.shape[1]
        h = self.heads
        q = self.q(x).view(b, lq, h, d // h).transpose(1, 2)
        # a context of batch 1 is shared by every query row (projected once; SDPA broadcasts it)
        k, v = self.kv(context).view(context.shape[0], lk, 2, h, d // h).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and not torch.compiler.is_compiling() and bool(attn_mask.all()):
            attn_mask = None  # nothing masked: SDPA's unmasked kernels are faster (eager only: data-dependent)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
        y = attend(q, k, v, attn_mask, self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, lq, d))

    def forward_grouped(
        self, x: torch.Tensor, context: torch.Tensor, context_valid: torch.Tensor, group: torch.Tensor
    ) -> torch.Tensor:
        """x [B, d] one query per row; row i attends to ``context[group[i]]`` ([G, n, d], valid keys [G, n];
        ``group`` [B] contiguous, numbered from 0): the same as :meth:`forward` over the context spread to every
        row, but each context is projected once and a group's queries are its query rows (padded to the largest
        group), not G·B·n projected keys (a served batch of several requests' candidates)."""
        b, d = x.shape
        g, n, _ = context.shape
        h = self.heads
        sizes = torch.bincount(group, minlength=g)
        pos = torch.arange(b, device=x.device) - (torch.cumsum(sizes, 0) - sizes)[group]
        rows = x.new_zeros(g, int(sizes.max()), d)
        rows[group, pos] = x
        q = self.q(rows).view(g, rows.shape[1], h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(g, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        mask: torch.Tensor | None = key_padding_mask(context_valid, rows.shape[1]).unsqueeze(1)  # [G, 1, 1, n]
        if mask is not None and not torch.compiler.is_compiling() and bool(mask.all()):
            mask = None  # as forward: SDPA's unmasked kernels
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(g, rows.shape[1], d))[group, pos]


class TransformerBlock(nn.Module):
    """Pre-LayerNorm Transformer block: attention, then a 4× FFN, both residual.

    With ``context`` the rows of ``x`` are queries over ``context`` (both normalized by the same LayerNorm):
    a last layer that only needs a few output rows computes only those (as OneTrans' pyramid stacking).
    No dropout inside: on CPU, sampling masks for [B, L, 4d] activations costs more than the block itself.
    """

    def __init__(self, dim: int, heads: int = 2, ffn_mult: int = 4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, None if context is None else self.norm1(context), attn_mask)
        return x + self.ffn(self.norm2(x))

    def forward_grouped(
        self, x: torch.Tensor, context: torch.Tensor, context_valid: torch.Tensor, group: torch.Tensor
    ) -> torch.Tensor:
        """x [B, d] one query row each over its group's context ([G, n, d]): :meth:`forward` with ``x[:, None]``
        and the context spread to every row, each context normalized and projected once
        (:meth:`MultiHeadAttention.forward_grouped`)."""
        x = x + self.attn.forward_grouped(self.norm1(x), self.norm1(context), context_valid, group)
        return x + self.ffn(self.norm2(x))


def key_padding_mask(valid: torch.Tensor, n_query: int) -> torch.Tensor:
    """[B, n] valid keys → [B, 1, n] boolean attention mask, broadcast over the ``n_query`` queries (never
    materialized per query: SDPA would turn a [B, n_query, n] mask into a float tensor of that size). A row with
    no valid key attends to every key (its output is then ignored by the caller) so SDPA never sees an
    all-masked row (NaN)."""
    del n_query  # kept in the signature: the mask is valid for any number of queries
    valid = valid | ~valid.any(dim=1, keepdim=True)
    return valid.unsqueeze(1)


class RankMixerBlock(nn.Module):
    """RankMixer (ByteDance, 2025): parameter-free token mixing (each token's channels are split into T heads
    and head h of every token is gathered into new token h), then a per-token FFN, both residual + LayerNorm."""

    def __init__(self, n_tokens: int, dim: int, ffn_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        if n_tokens < 1 or dim % n_tokens:
            raise ConfigError(f"RankMixer width {dim} must be divisible by the token count {n_tokens}")
        self.t, self.d = n_tokens, dim
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        # per-token FFN weights: [T, d, k*d] and [T, k*d, d]
        self.w1 = nn.Parameter(torch.randn(n_tokens, dim, ffn_mult * dim) / math.sqrt(dim))
        self.b1 = nn.Parameter(torch.zeros(n_tokens, ffn_mult * dim))
        self.w2 = nn.Parameter(torch.randn(n_tokens, ffn_mult * dim, dim) / math.sqrt(ffn_mult * dim))
        self.b2 = nn.Parameter(torch.zeros(n_tokens, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        mixed = x.view(b, t, t, d // t).transpose(1, 2).reshape(b, t, d)
        x = self.norm1(x + mixed)
        h = F.gelu(torch.einsum("btd,tdk->btk", x, self.w1) + self.b1)
        h = torch.einsum("btk,tkd->btd", self.drop(h), self.w2) + self.b2
        return self.norm2(x + h)


class CrossNetV2(nn.Module):
    """DCNv2 cross layers: x_{l+1} = x0 * (W x_l + b) + x_l."""

    def __init__(self, dim: int, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for lin in self.layers:
            x = x0 * lin(x) + x
        return x


class RecencyEncoding(nn.Module):
    """Embeds the time gap between a history row and the request: log2 buckets of seconds (0 = padding)."""

    def __init__(self, dim: int, buckets: int = 48):
        super().__init__()
        self.buckets = buckets
        self.table = nn.Embedding(buckets + 1, dim, padding_idx=0)

    def forward(self, gap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b = torch.log2(gap.clamp(min=0) + 1.0).long().clamp(max=self.buckets - 1) + 1
        return self.table(b * mask.long())


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over axis 1 of x [B, n, d] where mask [B, n] is True (zeros for empty rows)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)
