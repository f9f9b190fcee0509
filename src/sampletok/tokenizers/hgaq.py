"""SIF's Sample Tokenizer: hierarchical group-adaptive quantization (HGAQ).

A raw sample's fields are split by SIF group (user / item / context / cross); group g is cut into
``K_g = ceil(|F_g| / B)`` sub-tokens of about B fields (a field may be pinned with ``sub_token`` in the
schema). Each sub-token's field embeddings (``d_e`` each) are projected linearly to ``d0``, then quantized by
M levels of residual VQ, one codebook of V codes per (sub-token, level). Codebooks follow EMA updates
(k-means style), are initialized from data, restart dead codes from current residuals, and an entropy
regularizer keeps code usage spread. An auxiliary head predicts the sample's own label from the quantized
sub-tokens, so the codes are shaped by the label.

Own batched implementation rather than vector-quantize-pytorch's GroupedResidualVQ: here every (sub-token,
level) has its own codebook and the whole grid is quantized by one batched distance computation per level
(``[N, T, V]``), which is what the T × M layout needs; the library's grouped RVQ shares the level structure but
adds a module per group and per level (T·M modules) with Python loops over them.

Example:
    >>> from sampletok.schema import Schema
    >>> s = Schema.model_validate({"name": "x", "user": "u", "timestamp": "t", "labels": [{"name": "y"}],
    ...     "features": [{"name": f"f{i}", "type": "categorical", "group": "user"} for i in range(5)]})
    >>> [len(t) for t in assign_sub_tokens(s, fields_per_token=2)]
    [2, 2, 1]
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sampletok import distributed
from sampletok.errors import ConfigError, StoreError
from sampletok.features import Batch, FeatureLayout
from sampletok.nn import MLP, FeatureEmbedding
from sampletok.schema import GROUPS, Schema


class HGAQConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    fields_per_token: int = Field(32, ge=1, description="B: fields per sub-token")
    levels: int = Field(3, ge=1, description="M: residual VQ levels")
    codes: int = Field(256, ge=2, description="V: codes per codebook (with codebook_sizes: cardinality, the most)")
    codebook_sizes: Literal["fixed", "cardinality"] = Field(
        "fixed",
        description="fixed: every sub-token has V codes per level (the paper); cardinality: a sub-token whose "
        "fields are all categorical (or bucketized numerics) has min(V, the product of their vocabulary sizes) "
        "codes, as many as the distinct values it can take, the others V (so a large V buys codes only where "
        "values need them)",
    )
    d0: int = Field(16, ge=1)
    field_dim: int = Field(8, ge=1, description="d_e: per-field embedding width")
    commitment: float = 0.25
    ema_decay: float = Field(0.99, gt=0, lt=1)
    dead_threshold: float = Field(0.05, ge=0, description="EMA usage below which a code is restarted")
    entropy_weight: float = 0.01
    entropy_temperature: float = 1.0
    entropy_sample: int = Field(2048, ge=1, description="rows the entropy regularizer is estimated on")
    aux_weight: float = 0.1
    kernel: Literal["auto", "reference", "packed", "matmul"] = Field(
        "auto",
        description="nearest-code search: reference (every distance, then argmin), packed (CPU: blocked matmul, "
        "argmin read from the code index packed into each distance's low bits; V <= 256), matmul (blocked matmul "
        "and argmin, the GPU path), auto (packed on CPU where it applies, else matmul)",
    )


def assign_sub_tokens(schema: Schema | list, fields_per_token: int) -> list[list[str]]:
    """Field names of each sub-token, group by group: K_g = ceil(|F_g| / B); pinned fields first."""
    features = schema.features if isinstance(schema, Schema) else list(schema)
    tokens: list[list[str]] = []
    for g in GROUPS:
        fields = [f for f in features if f.group == g]
        if not fields:
            continue
        k = math.ceil(len(fields) / fields_per_token)
        slots: list[list[str]] = [[] for _ in range(k)]
        for f in fields:
            if f.sub_token is not None:
                if f.sub_token >= k:
                    raise ConfigError(
                        f"schema field '{f.name}' pinned to sub-token {f.sub_token}, group '{g}' has "
                        f"{k} (fields_per_token {fields_per_token}): lower its sub_token or "
                        "hgaq.fields_per_token"
                    )
                slots[f.sub_token].append(f.name)
        free = [f.name for f in fields if f.sub_token is None]
        for name in free:  # fill the emptiest slot first, in order: sub-tokens of about B fields
            min(slots, key=len).append(name)
        tokens += slots
    return tokens


def sub_token_codebook_sizes(sub_tokens: list[list[str]], layout: FeatureLayout, cfg: HGAQConfig) -> list[int]:
    """Codes per codebook of each sub-token: V, or with ``codebook_sizes: cardinality`` min(V, the product of
    its fields' vocabulary sizes) when every field is categorical or a bucketized numeric (a raw numeric or
    multi-hot field: V). Parked codes stay out of reach while residuals stay well below 1e4 per coordinate.

    Example:
        >>> from types import SimpleNamespace
        >>> layout = SimpleNamespace(vocab_sizes={"gender": 4, "age": 9, "item": 1700}, multi_fields=[])
        >>> sub_token_codebook_sizes([["gender", "age"], ["item"], ["score"]], layout,
        ...                          HGAQConfig(codes=1024, codebook_sizes="cardinality"))
        [36, 1024, 1024]
    """
    if cfg.codebook_sizes == "fixed":
        return [cfg.codes] * len(sub_tokens)
    multi = {f.name for f in layout.multi_fields}
    sizes = []
    for names in sub_tokens:
        if any(n not in layout.vocab_sizes or n in multi for n in names):
            sizes.append(cfg.codes)
        else:
            sizes.append(max(2, min(cfg.codes, math.prod(layout.vocab_sizes[n] for n in names))))
    return sizes


class ResidualVQ(nn.Module):
    """T independent M-level residual quantizers with EMA codebooks, data init and dead-code restart.

    ``sizes`` [T] (default V each) gives each sub-token's codes per codebook: the codebooks stay one [T, M, V, d]
    tensor, and a sub-token's codes past its size are parked at a point no residual comes near (``_PARKED``
    in every coordinate), so every nearest-code kernel skips them unchanged; the EMA update, the data
    initialization and the dead-code restart keep them parked."""

    _PARKED = 1e4  # squared distance ≈ d·1e8 to any residual of sane scale, far below float32's range

    # buffers (registered in __init__)
    codebook: torch.Tensor
    ema_count: torch.Tensor
    ema_sum: torch.Tensor
    initialized: torch.Tensor
    code_valid: torch.Tensor  # [T, V] bool: the codes each sub-token uses (not saved: the layout rebuilds it)

    def __init__(self, n_tokens: int, cfg: HGAQConfig, sizes: list[int] | None = None):
        super().__init__()
        t, m, v, d = n_tokens, cfg.levels, cfg.codes, cfg.d0
        self.cfg = cfg
        sizes = [v] * t if sizes is None else sizes
        if len(sizes) != t or not all(2 <= s <= v for s in sizes):
            raise ConfigError(f"hgaq codebook sizes {sizes}: need {t} sizes between 2 and codes ({v})")
        self.sizes = list(sizes)
        self._all_codes_used = all(s == v for s in sizes)
        self.register_buffer("code_valid", torch.arange(v).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1), False)
        self.register_buffer("codebook", torch.randn(t, m, v, d) * 0.1)
        self.register_buffer("ema_count", torch.ones(t, m, v))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._park()

    @torch.no_grad()
    def _park(self, level: int | None = None) -> None:
        """Keep the codes past each sub-token's size parked (a no-op when every sub-token has V codes)."""
        if self._all_codes_used:
            return
        levels = range(self.cfg.levels) if level is None else [level]
        parked = ~self.code_valid
        for lv in levels:
            self.codebook[:, lv][parked] = self._PARKED

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.codebook.shape)  # type: ignore[return-value]

    def version(self) -> str:
        return hashlib.sha256(self.codebook.detach().cpu().numpy().tobytes()).hexdigest()[:16]

    def _nearest(self, r: torch.Tensor, level: int, block: int = 1024) -> torch.Tensor:
        """Codes [N, T] of the nearest code to each residual r [N, T, d] at one level.

        ||r − c_v||² = ||r||² + [r, 1]·[−2 c_v, ||c_v||²]: one ``baddbmm`` per block of 1024 rows into a reused
        [T, block, V] buffer. The argmin is then read without ``min(-1).indices`` (which returns indices
        element by element, 2× the matmul's time): the distances are ≥ 0 floats, whose int32 bit patterns
        sort like the floats, so the low log2(V) bits are overwritten with the code index and one vectorized
        integer ``amin`` returns distance and index together. Codes whose distances agree to 2^-(23-log2 V)
        relative (3e-5 at V = 256) count as ties, won by the lower index; so do distances within rounding of 0
        (computed as −ε, whose negative int patterns beat every positive one). Used on CPU for V ≤ 256 (uint8
        codes, the default); larger codebooks and GPUs take the ``matmul`` kernel's exact argmin
        (``HGAQConfig.kernel`` picks one). 1.5-2× the exact path per level on this machine;
        ``_nearest_reference`` is the literal formula and property tests check every kernel against it."""
        lhs = torch.cat([r, r.new_ones(*r.shape[:-1], 1)], dim=-1).transpose(0, 1).contiguous()  # [T, N, d+1]
        return self._nearest_augmented(lhs, level, block).t().long()

    def _nearest_augmented(self, lhs: torch.Tensor, level: int, block: int = 1024) -> torch.Tensor:
        """Codes [T, N] (int32, or int64 for V > 256) from residuals in the augmented layout [T, N, d+1]
        (last column 1), the layout the distance matmul reads; see :meth:`_nearest`."""
        cb = self.codebook[:, level]  # [T, V, d]
        t, v, _ = cb.shape
        n = lhs.shape[1]
        index_bits = max(1, (v - 1).bit_length())
        packable = index_bits <= 8 and lhs.dtype == torch.float32
        kernel = self.cfg.kernel
        if kernel == "auto":
            kernel = "packed" if packable and lhs.device.type == "cpu" else "matmul"
        if kernel == "reference":
            return self._nearest_reference(lhs[..., :-1].transpose(0, 1), level).t()
        if kernel == "packed" and not packable:
            raise ConfigError(f"hgaq.kernel packed needs codes <= 256 and float32 residuals (codes: {v})")
        rhs = torch.cat([-2 * cb, cb.pow(2).sum(-1, keepdim=True)], dim=-1).transpose(1, 2).contiguous()
        if kernel == "matmul":
            # on a GPU one block of 32k rows keeps the device busy; on CPU 1024 rows stay in cache
            step = block if lhs.device.type == "cpu" else max(block, 32_768)
            out = torch.empty(t, n, dtype=torch.long, device=lhs.device)
            for i in range(0, n, step):  # loop over row blocks, not samples
                out[:, i : i + step] = torch.bmm(lhs[:, i : i + step], rhs).argmin(-1)
            return out
        r2 = lhs[..., :-1].pow(2).sum(-1, keepdim=True)  # [T, N, 1]
        code_ids = torch.arange(v, dtype=torch.int32, device=lhs.device)
        keep_high = ~((1 << index_bits) - 1)
        buf = torch.empty(t, min(block, n), v, device=lhs.device)
        out = torch.empty(t, n, dtype=torch.int32, device=lhs.device)
        for i in range(0, n, block):
            j = min(i + block, n)
            dist = buf if j - i == buf.shape[1] else buf[:, : j - i]
            torch.baddbmm(r2[:, i:j], lhs[:, i:j], rhs, out=dist)
            # no clamp: a distance rounded to −ε (true distance ≈ 0) reads as a negative int and wins, which
            # is right up to rounding; skipping the pass over [T, block, V] is 15 % of the encode
            bits = dist.view(torch.int32)
            out[:, i:j] = bits.bitwise_and_(keep_high).bitwise_or_(code_ids).amin(-1).bitwise_and_(~keep_high)
        return out

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes [N, T, M] (int64) of x [N, T, d]: the forward's nearest-code loop alone (no losses,
        straight-through or EMA), the residual kept in place in the augmented [T, N, d+1] layout so that no
        level re-lays it out. A test checks it returns the forward's codes."""
        n, t, d = x.shape
        v, m = self.cfg.codes, self.cfg.levels
        lhs = x.new_empty(t, n, d + 1)
        lhs[..., :d] = x.transpose(0, 1)
        lhs[..., d] = 1.0
        offsets = (torch.arange(t, device=x.device) * v).unsqueeze(1)  # code → row of the [T·V, d] codebook
        codes = torch.empty(n, t, m, dtype=torch.long, device=x.device)
        for level in range(m):
            code = self._nearest_augmented(lhs, level)  # [T, N]
            flat_cb = self.codebook[:, level].reshape(t * v, d)
            lhs[..., :d] -= flat_cb.index_select(0, (code + offsets).reshape(-1)).view(t, n, d)
            codes[:, :, level] = code.t()
        return codes

    def _nearest_reference(self, r: torch.Tensor, level: int) -> torch.Tensor:
        """The literal formula: full squared distances [N, T, V], then argmin."""
        cb = self.codebook[:, level]
        dist = (r.unsqueeze(2) - cb.unsqueeze(0)).pow(2).sum(-1)
        return dist.argmin(-1)

    def forward(
        self, x: torch.Tensor, update: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Quantize x [N, T, d] → (straight-through quantized [N, T, d], codes [N, T, M], losses)."""
        cfg = self.cfg
        if update and self.training and not bool(self.initialized):
            self._init_from_data(x.detach())
        r = x
        quant = torch.zeros_like(x)
        codes, commit, entropy = [], x.new_zeros(()), x.new_zeros(())
        t_idx = torch.arange(x.shape[1], device=x.device)
        # the entropy regularizer needs soft assignments [N, T, V]: estimate it on a fixed-size subsample
        sub = torch.randperm(len(x), device=x.device)[: cfg.entropy_sample] if len(x) > cfg.entropy_sample else None
        for level in range(cfg.levels):
            code = self._nearest(r.detach(), level)
            q = self.codebook[t_idx.unsqueeze(0), level, code]  # [N, T, d]
            commit = commit + (r - q.detach()).pow(2).mean()
            if cfg.entropy_weight > 0 and torch.is_grad_enabled():
                # soft assignment of the (gradient-carrying) residual: low per-sample entropy, high usage
                # entropy (skipped when encoding or evaluating: nothing would use it)
                cb = self.codebook[:, level].clone()  # a snapshot: the EMA update below writes in place
                rs = r if sub is None else r[sub]
                d_soft = (
                    rs.pow(2).sum(-1, keepdim=True)
                    - 2 * torch.einsum("ntd,tvd->ntv", rs, cb)
                    + cb.pow(2).sum(-1).unsqueeze(0)
                )
                p = torch.softmax(-d_soft / cfg.entropy_temperature, dim=-1)
                per_sample = -(p * torch.log(p + 1e-9)).sum(-1).mean()
                avg = p.mean(0)
                usage = -(avg * torch.log(avg + 1e-9)).sum(-1).mean()
                entropy = entropy + per_sample - usage
            if update and self.training:
                self._ema_update(r.detach(), code, level)
            quant = quant + q
            r = r - q.detach()
            codes.append(code)
        st = x + (quant - x).detach()  # straight-through
        losses = {"commit": cfg.commitment * commit, "entropy": cfg.entropy_weight * entropy}
        return st, torch.stack(codes, dim=-1), losses

    @torch.no_grad()
    def _init_from_data(self, x: torch.Tensor) -> None:
        """Each level's codebook starts from random residuals of the first batch (data initialization)."""
        n, t, _ = x.shape
        r = x.clone()
        gen = torch.Generator().manual_seed(0)
        t_idx = torch.arange(t, device=x.device)
        for level in range(self.cfg.levels):
            pick = torch.randint(0, n, (t, self.cfg.codes), generator=gen).to(x.device)
            init = r[pick, t_idx.unsqueeze(1)]  # [T, V, d]
            self.codebook[:, level] = init
            self.ema_sum[:, level] = init
            self.ema_count[:, level] = 1.0
            self._park(level)
            code = self._nearest(r, level)
            r = r - self.codebook[t_idx.unsqueeze(0), level, code]
        # data-parallel: every rank starts from rank 0's codebooks (its first batch)
        distributed.broadcast_(self.codebook, self.ema_sum, self.ema_count)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, r: torch.Tensor, code: torch.Tensor, level: int) -> None:
        n, t, d = r.shape
        v, decay = self.cfg.codes, self.cfg.ema_decay
        dev = r.device
        flat = (torch.arange(t, device=dev).unsqueeze(0) * v + code).reshape(-1)  # [N*T] index into (T, V)
        counts = torch.zeros(t * v, device=dev).index_add_(0, flat, torch.ones(n * t, device=dev)).view(t, v)
        sums = torch.zeros(t * v, d, device=dev).index_add_(0, flat, r.reshape(-1, d)).view(t, v, d)
        # data-parallel: the statistics of every rank's batch, so all ranks keep the same codebooks
        distributed.all_reduce_sum_(counts, sums)
        self.ema_count[:, level].mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum[:, level].mul_(decay).add_(sums, alpha=1 - decay)
        total = self.ema_count[:, level].sum(-1, keepdim=True)
        smoothed = (self.ema_count[:, level] + 1e-5) / (total + v * 1e-5) * total  # Laplace smoothing
        self.codebook[:, level] = self.ema_sum[:, level] / smoothed.unsqueeze(-1)
        self._park(level)
        # dead-code restart: codes whose EMA usage fell below the threshold take a random current residual
        dead = (self.ema_count[:, level] < self.cfg.dead_threshold) & self.code_valid
        if dead.any():  # the same codes are dead on every rank (same state): rank 0's residuals restart them
            tok, idx = dead.nonzero(as_tuple=True)
            pick = torch.randint(0, n, (len(tok),), device=dev)
            fresh = r[pick, tok].contiguous()
            distributed.broadcast_(fresh)
            self.codebook[tok, level, idx] = fresh
            self.ema_sum[tok, level, idx] = fresh
            self.ema_count[tok, level, idx] = 1.0

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., T, M] → summed code vectors [..., T, d]."""
        t, m = codes.shape[-2], codes.shape[-1]
        t_idx = torch.arange(t, device=codes.device).view(*([1] * (codes.dim() - 2)), t, 1)
        l_idx = torch.arange(m, device=codes.device).view(*([1] * (codes.dim() - 1)), m)
        return self.codebook[t_idx, l_idx, codes.long()].sum(-2)

    @torch.no_grad()
    def utilization(self, codes: torch.Tensor) -> dict[str, np.ndarray]:
        """Per (sub-token, level): perplexity of code usage and the count of unused codes in ``codes`` (of the
        sub-token's own codebook size); ``sampletok.report.codebooks.codebook_utilization`` on these sizes."""
        from sampletok.report.codebooks import codebook_utilization  # numpy only: no import cycle

        t, m = codes.shape[-2], codes.shape[-1]
        return codebook_utilization(codes.reshape(-1, t, m).cpu().numpy(), self.cfg.codes, self.sizes)


class SampleTokenizer(nn.Module):
    """Fields → sub-token vectors ``P x`` [N, T, d0] → residual VQ codes [N, T, M] (+ auxiliary label head)."""

    field_index: torch.Tensor  # buffer [T, fmax]: field positions of each sub-token

    def __init__(self, layout: FeatureLayout, cfg: HGAQConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = FeatureEmbedding(layout, cfg.field_dim)
        assert layout.features is not None, "HGAQ needs the layout's schema fields (FeatureLayout.from_dataset)"
        self.sub_tokens = assign_sub_tokens(layout.features, cfg.fields_per_token)
        order = {n: i for i, n in enumerate(layout.field_names)}
        t, fmax = len(self.sub_tokens), max(len(s) for s in self.sub_tokens)
        idx = torch.full((t, fmax), len(order), dtype=torch.long)  # len(order) = a zero field (padding)
        for ti, names in enumerate(self.sub_tokens):
            idx[ti, : len(names)] = torch.tensor([order[n] for n in names])
        self.register_buffer("field_index", idx)
        self.proj = nn.Parameter(torch.randn(t, fmax * cfg.field_dim, cfg.d0) / math.sqrt(fmax * cfg.field_dim))
        self.proj_bias = nn.Parameter(torch.zeros(t, cfg.d0))
        self.rvq = ResidualVQ(t, cfg, sub_token_codebook_sizes(self.sub_tokens, layout, cfg))
        self.aux_head = MLP(t * cfg.d0, [64], out_dim=len(layout.task_labels))

    @property
    def n_tokens(self) -> int:
        return len(self.sub_tokens)

    def project(
        self, batch: Batch, keep: torch.Tensor | None = None, embedded: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[N, T, d0] unquantized sub-token vectors P x; ``keep`` [F] bool zeroes the other fields' embeddings
        (the history-content ablations: item ID only, item ID + key fields); ``embedded``: ``self.embed(batch)``
        when the caller has it already."""
        e = self.embed(batch) if embedded is None else embedded  # [N, F, d_e]
        if keep is not None:
            e = e * keep.to(e.dtype)[None, :, None]
        e = torch.cat([e, e.new_zeros(len(e), 1, e.shape[-1])], dim=1)
        grouped = e[:, self.field_index].flatten(2)  # [N, T, fmax * d_e]
        return torch.einsum("ntk,tkd->ntd", grouped, self.proj) + self.proj_bias

    def forward(
        self, batch: Batch, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(quantized [N, T, d0], codes [N, T, M], losses incl. the auxiliary label loss)."""
        x = self.project(batch, keep)
        q, codes, losses = self.rvq(x)
        losses["aux_label"] = self.aux_label_loss(q, batch.labels)
        return q, codes, losses

    def aux_label_loss(self, q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The weighted auxiliary loss that shapes the codebooks by the label: the sample's own labels
        predicted from its quantized sub-tokens q [N, T, d0]."""
        return self.cfg.aux_weight * F.binary_cross_entropy_with_logits(self.aux_head(q.flatten(1)), labels)

    @torch.no_grad()
    def encode(self, batch: Batch, keep: torch.Tensor | None = None) -> np.ndarray:
        """Codes of a batch as the smallest unsigned dtype that holds V codes."""
        was = self.training
        self.eval()
        codes = self.rvq.encode(self.project(batch, keep))
        self.train(was)
        return codes.numpy().astype(code_dtype(self.cfg.codes))

    def decode(self, codes: np.ndarray | torch.Tensor, version: str | None = None) -> torch.Tensor:
        """Summed code vectors; refuses codes made with other codebooks when ``version`` is given."""
        if version is not None and version != self.rvq.version():
            raise StoreError(
                f"codes were made with codebook version {version}, this tokenizer has "
                f"{self.rvq.version()}; re-export the codes"
            )
        return self.rvq.decode(torch.as_tensor(np.asarray(codes)))


def code_dtype(codes: int) -> np.dtype:
    return np.dtype(np.uint8 if codes <= 256 else np.uint16 if codes <= 65536 else np.int32)
