"""Softmax attention with a kernel switch: a plain reference, torch SDPA, and a short-sequence kernel.

Every attention in the models goes through :func:`attend`. The kernel is picked per call:

- ``reference``: the formula written out (matmul, masked softmax, matmul) under autograd. Readable, slow.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels).
- ``short``: one batched matmul per product and a hand-written backward (:class:`_ShortAttention`). On CPU,
  SDPA's flash kernel is dominated by per-problem overhead when there are many tiny problems (SIF's mixer
  runs 21,504 attentions over 4 sub-tokens and 4,096 over 21 samples per batch of 1,024): this kernel does
  the same arithmetic 1.4-3× faster forward + backward there, but it materializes the [Lq, Lk] scores, so
  it loses to SDPA on long sequences.
- ``auto`` (the default): ``short`` on CPU when there are at most :data:`SHORT_MAX_KEYS` keys and no
  dropout, else ``sdpa``.

``use_attention_kernel("reference")`` switches every call inside a ``with`` block (tests compare the kernels
on values and gradients with hypothesis).

    >>> import torch
    >>> q, k, v = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    >>> mask = torch.rand(3, 1, 1, 7) > 0.3
    >>> mask[..., 0] = True  # every query has a key
    >>> fast = attend(q, k, v, mask)
    >>> with use_attention_kernel("reference"):
    ...     ref = attend(q, k, v, mask)
    >>> bool(torch.allclose(fast, ref, atol=1e-5))
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sampletok.errors import ConfigError

AttentionKernel = Literal["auto", "reference", "sdpa", "short"]
KERNELS: tuple[str, ...] = ("auto", "reference", "sdpa", "short")
SHORT_MAX_KEYS = 32  # above this the [Lq, Lk] scores cost more memory traffic than SDPA's overhead (measured)
_kernel: AttentionKernel = "auto"


@contextmanager
def use_attention_kernel(name: AttentionKernel) -> Iterator[None]:
    """Every :func:`attend` call inside the block uses kernel ``name``."""
    global _kernel
    if name not in KERNELS:
        raise ConfigError(f"unknown attention kernel {name!r}: choose one of {', '.join(KERNELS)}")
    previous, _kernel = _kernel, name
    try:
        yield
    finally:
        _kernel = previous


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention. q [B, H, Lq, dh]; k, v [B or 1, H, Lk, dh]; ``mask`` boolean (True = may attend),
    broadcastable to [B, H, Lq, Lk]. Returns [B, H, Lq, dh]."""
    kernel = _kernel
    if kernel == "auto":
        short = (
            q.device.type == "cpu"
            and k.shape[-2] <= SHORT_MAX_KEYS
            and dropout_p == 0.0
            and k.shape[0] == q.shape[0]  # a shared context broadcasts for free in SDPA
            and not torch.compiler.is_compiling()
        )
        kernel = "short" if short else "sdpa"
    if kernel == "sdpa" or (kernel == "short" and dropout_p > 0.0):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if kernel == "reference":
        return reference_attention(q, k, v, mask, dropout_p)
    b, h, lq, dh = q.shape
    k, v = k.expand(b, -1, -1, -1).to(q.dtype), v.expand(b, -1, -1, -1).to(q.dtype)
    bias = None if mask is None else _additive(mask, q.dtype)
    out = _ShortAttention.apply(
        q.reshape(b * h, lq, dh), k.reshape(b * h, -1, dh), v.reshape(b * h, -1, dh), bias, (b, h)
    )
    return out.view(b, h, lq, dh)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q kᵀ / √dh, masked) v, written out."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask → 0 / −inf bias, kept at its broadcast shape (4-d: [B|1, H|1, Lq|1, Lk])."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class _ShortAttention(torch.autograd.Function):
    """Attention over contiguous [N, L, dh] problems as batched matmuls, with the softmax backward written
    out (ds = p ∘ (dp − rowsum(do ∘ o))) so autograd keeps no intermediate beyond p and o."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # backward runs under the forward's autocast state
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        heads: tuple[int, int],
    ) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
        if bias is not None:  # broadcast over [B, H, Lq, Lk] without materializing the mask per head
            b, h = heads
            scores.view(b, h, *scores.shape[1:]).add_(bias)
        p = torch.softmax(scores, dim=-1)
        o = torch.bmm(p, v)
        ctx.save_for_backward(q, k, v, p, o)
        ctx.scale = scale
        return o

    @staticmethod
    @once_differentiable  # p and o are saved as constants: no double backward
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, p, o = ctx.saved_tensors
        do = grads[0].contiguous()
        dv = torch.bmm(p.transpose(1, 2), do)
        dp = torch.bmm(do, v.transpose(1, 2))
        ds = p * (dp - (do * o).sum(-1, keepdim=True))
        dq = torch.bmm(ds, k).mul_(ctx.scale)
        dk = torch.bmm(ds.transpose(1, 2), q).mul_(ctx.scale)
        return dq, dk, dv, None, None
