"""SIF (Sample Is Feature): every history row is a whole raw sample, quantized by HGAQ into T × M codes;
the SIF-Mixer mixes the (L+1) × T grid at token level and at sample level.

Input grid ``(L+1) × T × width``: row 0 is the current request through the alignment projection
``R (P x)`` (never quantized), rows 1..L are the user's history samples strictly before the request, as
decoded code sums (quantized on the fly during joint training from ``Batch.history_samples``, or decoded
from exported codes that the loader fetched into ``Batch.tokens`` when ``store`` is given), plus a recency
encoding; padded rows are masked out of sample-level attention, so
they never influence the target. Loss: BCE + ``vq_weight`` · (commitment + entropy) + ``align_weight`` ·
``||R x − sg(RVQ(P x))||²`` + the tokenizer's auxiliary label loss.

Model width: the sub-tokens (d0 = 16) are projected up to ``width`` (default 32) before mixing, so 4 heads
have 8 dimensions each (8 heads on d0 = 16 would leave 2-dim heads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar, Literal, cast

import numpy as np
import torch
from torch import nn

from sampletok.errors import ConfigError, validated
from sampletok.features import Batch, FeatureLayout, TokenInput
from sampletok.models.base import ModelOutput, RankingModel, register
from sampletok.nn import MLP, ResponseEncoder
from sampletok.nn.layers import MultiHeadAttention, RecencyEncoding, key_padding_mask
from sampletok.search_space import TRAIN_SPACE, Space, choice, integer
from sampletok.tokenizers.hgaq import HGAQConfig, SampleTokenizer


class MixerBlock(nn.Module):
    """Pre-LN residual: attention across sub-tokens in each row, across rows at each sub-token, then FFN."""

    def __init__(self, width: int, heads: int, ffn_mult: int = 4):
        super().__init__()
        self.n1, self.n2, self.n3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.token_attn = MultiHeadAttention(width, heads)
        self.sample_attn = MultiHeadAttention(width, heads)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width))

    def forward(self, x: torch.Tensor, row_mask: torch.Tensor, target_only: bool = False) -> torch.Tensor:
        """[B, R, T, d] → [B, R, T, d]; with ``target_only`` → [B, 1, T, d], the target row alone (exact:
        the last block's history rows feed nothing but the target's keys, so their own sample attention and
        FFN — the O(R²) part — are skipped)."""
        b, r, t, d = x.shape
        cols = self._rows(x).transpose(1, 2).reshape(b * t, r, d)
        mask = key_padding_mask(row_mask.repeat_interleave(t, dim=0), r)
        if target_only:
            keys = self.n2(cols)
            target = cols[:, :1] + self.sample_attn(keys[:, :1], keys, mask)
            x = target.view(b, t, 1, d).transpose(1, 2)
        else:
            cols = cols + self.sample_attn(self.n2(cols), None, mask)
            x = cols.view(b, t, r, d).transpose(1, 2)
        return x + self.ffn(self.n3(x))

    def _target_over_shared(self, tq: torch.Tensor, hk: torch.Tensor, hmask: torch.Tensor) -> torch.Tensor:
        """Sample attention of B target rows ``tq`` [B·T, 1, d] (normalized) over themselves and one history
        ``hk`` [T, L, d] (normalized; ``hmask`` [T, L]) whose keys and values are projected once, not B
        times: the same softmax attention as the plain path (a test checks it), as two einsums."""
        att = self.sample_attn
        bt, _, d = tq.shape
        t, l = hk.shape[:2]
        b, nh, dh = bt // t, att.heads, d // att.heads
        q = att.q(tq).view(b, t, nh, dh)
        kt, vt = att.kv(tq).view(b, t, 2, nh, dh).unbind(2)
        kh, vh = att.kv(hk).view(t, l, 2, nh, dh).unbind(2)
        scale = dh**-0.5
        s_self = (q * kt).sum(-1, keepdim=True) * scale  # [B, T, H, 1]
        s_hist = torch.einsum("bthd,tlhd->bthl", q, kh) * scale  # [B, T, H, L]
        s_hist = s_hist.masked_fill(~hmask[None, :, None, :], float("-inf"))
        w = torch.softmax(torch.cat([s_self, s_hist], dim=-1), dim=-1)
        y = w[..., :1] * vt + torch.einsum("bthl,tlhd->bthd", w[..., 1:], vh)  # [B, T, H, dh]
        return att.out(y.reshape(bt, 1, d))

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Token-level attention inside each row of ``x`` [B, R, T, d]."""
        b, r, t, d = x.shape
        flat = x.reshape(b * r, t, d)
        return (flat + self.token_attn(self.n1(flat))).view(b, r, t, d)

    def isolated(
        self,
        target: torch.Tensor,
        hist: torch.Tensor,
        hist_mask: torch.Tensor,
        target_only: bool = False,
        group_sizes: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block with history rows that do not attend to the target row: ``hist`` [B_h, L, T, d] evolves
        on its own (so B_h = 1 serves every candidate of one request), ``target`` [B, 1, T, d] attends to
        itself and the history. Equal to :meth:`forward` with the history→target attention masked out.
        ``group_sizes``: with B_h histories for B target rows, how many consecutive target rows read each
        (a served batch of several requests). With ``target_only`` (the last block) the history is returned
        as it came in, not updated."""
        b, _, t, d = target.shape
        bh, l = hist.shape[:2]
        target, hist = self._rows(target), self._rows(hist)
        hcols = hist.transpose(1, 2).reshape(bh * t, l, d)
        hmask = hist_mask.repeat_interleave(t, dim=0)
        tcols = target.transpose(1, 2).reshape(b * t, 1, d)
        if bh == 1 and b > 1 and not self.training:  # one shared history: its keys are projected once
            new_target = tcols + self._target_over_shared(self.n2(tcols), self.n2(hcols), hmask)
        elif group_sizes is not None and bh == len(group_sizes) and bh != b:  # one history per group of rows
            tq, hk, parts, start = self.n2(tcols), self.n2(hcols), [], 0
            for g, n in enumerate(group_sizes):  # a loop over requests, not samples
                rows, own = slice(start * t, (start + n) * t), slice(g * t, (g + 1) * t)
                parts.append(self._target_over_shared(tq[rows], hk[own], hmask[own]))
                start += n
            new_target = tcols + torch.cat(parts)
        else:
            # the plain path: every target row gets its copy of the history
            hk, hm = (hcols.repeat(b, 1, 1), hmask.repeat(b, 1)) if bh != b else (hcols, hmask)
            keys = torch.cat([tcols, hk], dim=1)
            kmask = torch.cat([hm.new_ones(b * t, 1), hm], dim=1)
            new_target = tcols + self.sample_attn(self.n2(tcols), self.n2(keys), key_padding_mask(kmask, 1))
        target = new_target.view(b, t, 1, d).transpose(1, 2)
        target = target + self.ffn(self.n3(target))
        if target_only:
            return target, hist
        new_hist = hcols + self.sample_attn(self.n2(hcols), None, key_padding_mask(hmask, l))
        hist = new_hist.view(bh, t, l, d).transpose(1, 2)
        return target, hist + self.ffn(self.n3(hist))


class FlatBlock(nn.Module):
    """Ablation: one attention over all (L+1)·T tokens (cost O((LT)²))."""

    def __init__(self, width: int, heads: int, ffn_mult: int = 4):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width))

    def forward(self, x: torch.Tensor, row_mask: torch.Tensor, target_only: bool = False) -> torch.Tensor:
        b, r, t, d = x.shape
        flat = x.reshape(b, r * t, d)
        mask = key_padding_mask(row_mask.repeat_interleave(t, dim=1), r * t)
        if target_only:  # the target row's T tokens are the only queries the head needs
            keys = self.n1(flat)
            flat = flat[:, :t] + self.attn(keys[:, :t], keys, mask)
            r = 1
        else:
            flat = flat + self.attn(self.n1(flat), None, mask)
        flat = flat + self.ffn(self.n2(flat))
        return flat.view(b, r, t, d)


@register("sif")
class SIF(RankingModel):
    # searched by `sampletok tune` (sampletok.train.tune): keys are this model's params or training settings
    search_space: ClassVar[dict[str, Space]] = {
        **TRAIN_SPACE,
        "width": choice(16, 32, 64),
        "blocks": integer(1, 4),
        "hgaq.fields_per_token": choice(8, 16, 32),  # B
        "hgaq.codes": choice(64, 128, 256),  # codebook size V
    }

    history_keep: torch.Tensor | None  # buffer [F] bool: the fields a history row keeps (None: all)

    def __init__(
        self,
        layout: FeatureLayout,
        hgaq: HGAQConfig | None = None,  # or its fields as a dict (validated into one)
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
        isolate_target: bool = False,
        code_cache_steps: int = 0,
        exact_fields: list[str] | None = None,
        head_fields: bool = False,
    ):
        """Build the model; every argument but ``layout`` is a key of its ``params`` in an experiment.

        Args:
            layout: the batch's column order and vocabulary sizes (:class:`~sampletok.features.FeatureLayout`).
            hgaq: the Sample Tokenizer's config (:class:`~sampletok.tokenizers.hgaq.HGAQConfig`, or its fields).
            width: token width of the SIF-Mixer (sub-tokens of width d0 are projected up to it).
            blocks: SIF-Mixer blocks.
            heads: attention heads.
            hidden: MLP widths of the prediction head.
            mixer: ``factored`` (token level, then sample level), ``flat`` (one attention over the grid) or
                ``pool``.
            vq_weight: weight of the commitment and entropy losses.
            align_weight: weight of the alignment loss.
            store: exported codes to read (None: history rows quantized on the fly from whole past samples).
            history_responses: add a history row's known responses: True all, a list the named, False none.
            history_fields: the fields a history row keeps (None: the whole raw sample).
            quantize_history: quantize history rows (False: the dense projection, an ablation).
            isolate_target: history rows do not attend to the target row (one history pass serves all candidates).
            code_cache_steps: training only: reuse a history row's codes for this many steps (0: no cache).
            exact_fields: categorical fields (e.g. the item ID) that every row, history and target, also carries
                as one exact, unquantized token beside its quantized sub-tokens (None: none, the paper's SIF).
            head_fields: the head also reads the request's field embeddings (the tokenizer's, concatenated),
                as DIN's and HSTU's heads do (False: the target row's mean only, the paper's head).
        """
        super().__init__(layout)
        self.cfg = hgaq if isinstance(hgaq, HGAQConfig) else validated(HGAQConfig, hgaq or {}, prefix="hgaq.")
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
        # serving option: history rows do not attend to the target row, so one history pass serves every
        # candidate of a request (Batch.history_group); the target row still attends to the whole history
        if isolate_target and mixer == "flat":
            raise ConfigError("isolate_target needs the factored or pool mixer (the flat mixer has no rows)")
        self.isolate_target = isolate_target
        block = FlatBlock if mixer == "flat" else MixerBlock
        self.blocks = nn.ModuleList(block(width, heads) for _ in range(blocks))
        # lever of issue 25: the baselines' heads read every request field's embedding beside their sequence
        # output; the paper's SIF head reads only the mixed target row's mean (width numbers)
        self.head_fields = head_fields
        head_in = width + (layout.n_fields * self.cfg.field_dim if head_fields else 0)
        self.head = MLP(head_in, list(hidden), out_dim=self.n_tasks)
        self.vq_weight, self.align_weight, self.store_path = vq_weight, align_weight, store
        self.target_only_last = True  # False: every block computes every row (the reference; tests compare)
        # training lever: a past row is read as history by up to L later requests; with a cache its codes are
        # computed once per ``code_cache_steps`` steps (and at each epoch's start) instead of at every read.
        # 0 = the reference: every history row quantized on every read, with gradients and EMA updates.
        if code_cache_steps < 0:
            raise ConfigError(f"code_cache_steps must be >= 0 (0: no cache), got {code_cache_steps}")
        if code_cache_steps and not quantize_history:
            raise ConfigError("code_cache_steps needs quantize_history: a dense history has no codes to cache")
        self.code_cache_steps = code_cache_steps
        # lever of issue 25: residual quantization keeps a row's content but not an item ID's identity (V^M
        # codes shared by every field of a sub-token); exact slots give chosen IDs their own embedding, as the
        # baselines have, in one extra token per row (the task label needs none: it is a response, added
        # unquantized to every sub-token by the response encoder)
        cat_names = [f.name for f in layout.cat_fields]
        bad = sorted(set(exact_fields or []) - set(cat_names))
        if bad:
            raise ConfigError(f"exact_fields {bad} are not categorical fields of the schema ({cat_names})")
        if exact_fields and store:
            raise ConfigError("exact_fields need whole past samples: a code store holds only codes")
        self.exact_fields = list(exact_fields or [])
        self.exact_positions = [cat_names.index(n) for n in self.exact_fields]
        self.exact = nn.ModuleList(nn.Embedding(layout.vocab_sizes[n], width, padding_idx=0) for n in self.exact_fields)
        self.exact_proj = nn.Linear(width * len(self.exact_fields), width) if self.exact_fields else None
        # plain attributes, not buffers: per process (DDP must not broadcast them) and never checkpointed
        self._cache_codes: torch.Tensor | None = None  # [R, T, M] codes of dataset row r
        self._cache_step: torch.Tensor | None = None  # [R] the training step that computed them
        self._cache_clock = 0  # training steps seen since the cache was last cleared

    def train(self, mode: bool = True) -> SIF:
        # each epoch (each return to training) starts from codes of the current codebooks; evaluation, export
        # and serving quantize on the fly and never carry the cache (nor pickle it to workers)
        self._cache_codes = self._cache_step = None
        self._cache_clock = 0
        return super().train(mode)

    def _reads_code_cache(self, batch: Batch) -> bool:
        """Whether this forward reads history codes from the cache: training, eager, whole past samples."""
        return (
            self.training and self.code_cache_steps > 0 and batch.tokens is None and not torch.compiler.is_compiling()
        )

    @property
    def reads_history_samples(self) -> bool:
        """Joint training quantizes whole past samples (``Batch.history_samples``); with a code store the
        codes come in ``Batch.tokens`` instead."""
        return not self.store_path

    @property
    def token_input(self) -> TokenInput | None:
        """With ``store``: the exported codes of its history rows (one per history position); else none."""
        return TokenInput("sif", self.store_path) if self.store_path else None

    def check_code_store(self, meta: dict, dataset: str) -> None:
        """Refuse a store that is not SIF codes of this dataset made with this model's codebooks."""
        if meta.get("kind") != "sif" or meta.get("dataset") != dataset:
            raise ConfigError(f"{self.store_path}: not a SIF code store of dataset {dataset}")
        if not self.quantize_history:
            raise ConfigError("a dense-history SIF (quantize_history: false) cannot read codes from a store")
        self.tokenizer.decode(
            np.zeros((1, self.tokenizer.n_tokens, self.cfg.levels), np.uint8), version=meta.get("codebook_version")
        )

    def _history(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
        """[B, L, T, d0] history sub-tokens, ([B, L, R] responses, [B, L, R] known) (+ VQ losses when the
        history is quantized on the fly)."""
        b, l = batch.hist_rows.shape
        t, d0 = self.tokenizer.n_tokens, self.cfg.d0
        out = batch.num.new_zeros(b, l, t, d0)
        mask = batch.hist_mask
        labels = (batch.hist_responses, batch.hist_response_mask)
        eager = not torch.compiler.is_compiling()  # data-dependent checks only outside torch.export/compile
        if eager and not mask.any():
            return out, labels, {}
        codes = batch.row_tokens()
        if codes is not None:  # exported codes, fetched by the loader
            if eager and not torch.equal(codes.mask, mask):
                raise ConfigError("the code store does not hold the same history rows as the dataset")
            decoded = self.tokenizer.rvq.decode(codes.payload)  # [B, L, T, d0]
            return decoded * mask[..., None, None], (codes.responses, codes.response_mask), {}
        samples, index = batch.history_samples, batch.history_sample_index
        if samples is None or index is None:
            raise ConfigError(
                "SIF reads whole past samples: build its batches with BatchLoader(..., history_samples=True)"
            )
        if self._reads_code_cache(batch):
            q, losses = self._cached_history(samples), {}
        elif self.quantize_history:
            q, _, losses = self.tokenizer(samples, self.history_keep)
        else:
            q, losses = self.tokenizer.project(samples, self.history_keep), {}
        # a gather, not a masked assignment (no data-dependent shape): index -1 (padding) reads the zero row
        return torch.cat([q.new_zeros(1, *q.shape[1:]), q])[index + 1], labels, losses

    @torch.no_grad()
    def _cached_history(self, samples: Batch) -> torch.Tensor:
        """[n, T, d0] decoded codes of the batch's distinct history rows from the code cache: only rows whose
        codes are ``code_cache_steps`` or more training steps old are quantized again (without gradient: the
        projection and codebooks learn from the request rows, whose quantization feeds the EMA and the
        auxiliary label head)."""
        rows = samples.rows
        self._cache_clock += 1
        if not len(rows):
            return samples.num.new_zeros(0, self.tokenizer.n_tokens, self.cfg.d0)
        need = int(rows.max()) + 1
        codes, step = self._cache_codes, self._cache_step
        if codes is None or step is None or codes.device != rows.device or len(codes) < need:
            # an eighth of headroom: the first batch of a shuffled epoch already reads rows near the last one, so
            # this is one allocation in practice, and at most a few dozen for ids that only grow
            size = max(need + need // 8, len(codes) + len(codes) // 8 if codes is not None else 0)
            # the smallest integer type that holds V codes: 9 bytes a row with T = 3, M = 3, V = 256
            dtype = torch.uint8 if self.cfg.codes <= 256 else torch.int16 if self.cfg.codes <= 32768 else torch.int32
            grown = torch.zeros(size, self.tokenizer.n_tokens, self.cfg.levels, dtype=dtype, device=rows.device)
            grown_step = torch.full((size,), -(2**30), dtype=torch.int32, device=rows.device)
            if codes is not None and step is not None and codes.device == rows.device:
                grown[: len(codes)], grown_step[: len(step)] = codes, step
            codes, step = self._cache_codes, self._cache_step = grown, grown_step
        stale = step[rows] <= self._cache_clock - self.code_cache_steps  # computed k or more steps ago
        if bool(stale.any()):
            x = self.tokenizer.project(samples, self.history_keep)[stale]
            fresh = rows[stale]
            codes[fresh] = self.tokenizer.rvq.encode(x).to(codes.dtype)
            step[fresh] = self._cache_clock
        return self.tokenizer.rvq.decode(codes[rows])

    def _exact_token(self, rows: Batch) -> torch.Tensor:
        """[N, width] the exact token of each row: its ``exact_fields`` embedded (unquantized) and mixed."""
        assert self.exact_proj is not None
        parts = [table(rows.cat[:, i]) for table, i in zip(self.exact, self.exact_positions, strict=True)]
        return self.exact_proj(torch.cat(parts, dim=-1))  # its bias: the exact token's position

    def _history_exact(self, hb: Batch) -> torch.Tensor:
        """[B_h, L, width] the exact token of each history row (zeros at padding)."""
        samples, index = hb.history_samples, hb.history_sample_index
        if samples is None or index is None:
            raise ConfigError("exact_fields read whole past samples: BatchLoader(..., history_samples=True)")
        e = self._exact_token(samples)
        return torch.cat([e.new_zeros(1, e.shape[-1]), e])[index + 1]

    def forward(self, batch: Batch) -> ModelOutput:
        if not torch.compiler.is_compiling():  # padding-only history positions change nothing here: drop them
            batch = batch.trimmed_history()
        fields = self.tokenizer.embed(batch)  # [B, F, d_e]
        x = self.tokenizer.project(batch, embedded=fields)  # [B, T, d0] the request, never quantized here
        target = torch.einsum("btd,tde->bte", x, self.align)
        # rows sharing a history (a served request's candidates): an isolated history pass runs once per history
        grouped = batch.grouped_history and self.isolate_target
        hb = _history_heads(batch) if grouped else batch
        sizes = batch.history_group_sizes() if grouped else None
        cached = self._reads_code_cache(hb)
        if cached:  # the request rows first: the first step's data init and each EMA step precede cached codes
            q_target, _, vq = self.tokenizer.rvq(x)
        hist, hist_labels, losses = self._history(hb)
        aux: dict[str, torch.Tensor] = {}
        if self.training:
            if not cached:
                q_target, _, vq = self.tokenizer.rvq(x)
            aux["align"] = self.align_weight * (target - q_target.detach()).pow(2).mean()
            for k, v in vq.items():
                losses[k] = losses.get(k, 0) + v
            if cached:  # cached history codes carry no loss: the label-shaping head reads the request rows
                losses["aux_label"] = self.tokenizer.aux_label_loss(q_target, batch.labels)
            aux.update({f"vq_{k}": self.vq_weight * v for k, v in losses.items() if k != "aux_label"})
            if "aux_label" in losses:
                aux["aux_label"] = losses["aux_label"]
        rec = self.recency(hb.hist_gap, hb.hist_mask)  # [B_h, L, width]
        if self.responses is not None:
            rec = rec + self.responses(*hist_labels) * hb.hist_mask.unsqueeze(-1)
        h_target = self.up(target.unsqueeze(1)) + self.token_pos + self.target_row  # [B, 1, T, width]
        h_hist = self.up(hist) + self.token_pos + rec.unsqueeze(2)  # [B_h, L, T, width]
        if self.exact_fields:  # one more token per row: T + 1
            e_target = self._exact_token(batch) + self.target_row
            e_hist = self._history_exact(hb) + rec
            h_target = torch.cat([h_target, e_target[:, None, None, :]], dim=2)
            h_hist = torch.cat([h_hist, e_hist.unsqueeze(2)], dim=2)
        if self.mixer == "pool":  # each row's sub-tokens averaged into one token
            h_target, h_hist = h_target.mean(2, keepdim=True), h_hist.mean(2, keepdim=True)
        # the head reads the target row only, so the last block computes only that row (exact, and it skips
        # that block's O(L²) sample attention among history rows; ``target_only=False`` is the reference)
        last = len(self.blocks) - 1
        if self.isolate_target:
            for i, block in enumerate(self.blocks):
                h_target, h_hist = cast(MixerBlock, block).isolated(
                    h_target, h_hist, hb.hist_mask, target_only=self.target_only_last and i == last, group_sizes=sizes
                )
            return ModelOutput(self.head(self._head_input(h_target[:, 0], fields)), aux)
        h = torch.cat([h_target, h_hist], dim=1)
        row_mask = torch.cat([batch.hist_mask.new_ones(len(batch), 1), batch.hist_mask], dim=1)
        for i, block in enumerate(self.blocks):
            h = block(h, row_mask, target_only=self.target_only_last and i == last)
        return ModelOutput(self.head(self._head_input(h[:, 0], fields)), aux)

    def _head_input(self, target: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """The mixed target row [B, T, width] → its mean over sub-tokens (and, with ``head_fields``, the
        request's field embeddings [B, F, d_e] flattened beside it)."""
        pooled = target.mean(1)
        return torch.cat([pooled, fields.flatten(1)], dim=1) if self.head_fields else pooled


def _history_heads(batch: Batch) -> Batch:
    """``batch`` with one history per history group (its first row's), not one per row."""
    heads = batch.history_heads()
    first = {
        name: getattr(batch, name)[heads]
        for name in ("hist_rows", "hist_mask", "hist_gap", "hist_responses", "hist_response_mask")
    }
    index = batch.history_sample_index
    return replace(
        batch,
        **first,
        history_sample_index=None if index is None else index[heads],
        tokens=batch.group_tokens(),
        tokens_by_group=False,  # here the history rows are the groups' too
    )
