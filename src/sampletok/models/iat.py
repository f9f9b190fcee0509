"""IAT stage II: a base ranking model (DIN, BST or RankMixer) plus an instance-token branch.

For each request the branch reads the user's last ``token_len`` instance embeddings strictly before the
request time (fetched from the token store by the loader into ``Batch.tokens``: no gradient can reach them), builds
``token = concat(adapt_MLP(InsEmb), side_embedding)`` where the side embedding encodes the instance's labels
*available at request time* and its time gap, and runs a target-aware sequence model (Transformer by
default, DIN as an option) with a query compressed from the request's features (or the item id only). The
resulting vector enters the base model's interaction block **before** interaction (default) or is fused
after it. The base model's own item-ID history branch is kept.

The store is built by a source model (:mod:`sampletok.tokenizers.iat`) trained on the training window, once
per (dataset, source config, seed) and cached, or read from ``store`` when given. By default the export is
time-causal (``source: {export_order: causal}``): no token a training request reads was made by parameters
that saw that request's label or a later one.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Protocol, cast

import torch
from torch import nn

from sampletok.errors import ConfigError
from sampletok.features import Batch, FeatureLayout, TokenInput
from sampletok.models.base import ModelOutput, RankingModel, build_model, register
from sampletok.nn import MLP, FeatureEmbedding, ResponseEncoder, TargetAttention, TransformerBlock
from sampletok.nn.layers import RecencyEncoding, key_padding_mask
from sampletok.search_space import TRAIN_SPACE, Space, choice, integer
from sampletok.tokenizers.iat import IATSourceConfig

BASES = ("din", "bst", "rankmixer")


class _Base(Protocol):
    """What IAT reads of its base model (one of BASES): field embeddings and the interaction block's input."""

    embed: FeatureEmbedding

    def feature_input(self, batch: Batch) -> torch.Tensor: ...

    def predict_from(self, x: torch.Tensor) -> torch.Tensor: ...


@register("iat")
class IAT(RankingModel):
    # searched by `sampletok tune` (sampletok.train.tune): keys are this model's params or training settings
    search_space: ClassVar[dict[str, Space]] = {
        **TRAIN_SPACE,
        "token_dim": choice(32, 64, 128),
        "out_dim": choice(16, 32, 64),
        "encoder_layers": integer(1, 2),
    }

    def __init__(
        self,
        layout: FeatureLayout,
        base: str = "din",
        base_params: dict[str, Any] | None = None,
        source: IATSourceConfig | None = None,  # or its fields as a dict (validated into one)
        store: str | None = None,
        token_len: int = 256,
        token_dim: int = 64,
        side_dim: int = 64,
        side_info: bool = True,
        side_responses: bool | list[str] = True,
        query: Literal["compressed", "id"] = "compressed",
        seq_model: Literal["transformer", "din"] = "transformer",
        placement: Literal["before", "after"] = "before",
        out_dim: int = 32,
        heads: int = 2,
        encoder_layers: int = 1,
        ffn_mult: int = 4,
        cache_dir: str = "runs/iat-cache",
    ):
        """Build the model; every argument but ``layout`` is a key of its ``params`` in an experiment.

        Args:
            layout: the batch's column order and vocabulary sizes (:class:`~sampletok.features.FeatureLayout`).
            base: the base ranking model (``din``, ``bst`` or ``rankmixer``).
            base_params: the base model's parameters.
            source: the source model's config (:class:`~sampletok.tokenizers.iat.IATSourceConfig`, or its fields).
            store: a token store to read (None: the causal store the source config builds, cached in
                ``cache_dir``).
            token_len: instance tokens per request (the last ones strictly before it).
            token_dim: width of the adapted instance embedding.
            side_dim: width of the side embedding (known responses + time gap).
            side_info: add the side embedding to each token.
            side_responses: which responses the side embedding reads: True all, a list the named, False none.
            query: the attention query: ``compressed`` (all request fields) or ``id`` (the item id).
            seq_model: ``transformer`` (self-attention, then target cross-attention) or ``din`` (target attention).
            placement: the branch's vector enters the base ``before`` interaction or is fused ``after`` it.
            out_dim: width of the branch's output vector.
            heads: attention heads.
            encoder_layers: self-attention layers over the tokens.
            ffn_mult: FFN width multiple.
            cache_dir: where built stores are cached (by dataset, source config and seed).
        """
        super().__init__(layout)
        if base not in BASES:
            raise ConfigError(f"IAT base must be one of {BASES}, got '{base}'")
        self.source_cfg = source if isinstance(source, IATSourceConfig) else IATSourceConfig(**(source or {}))
        self.store_path, self.cache_dir = store, cache_dir
        self.token_len, self.side_info, self.query_kind = token_len, side_info, query
        self.seq_kind, self.placement = seq_model, placement
        params = {**(base_params or {}), "extra_dim": out_dim if placement == "before" else 0}
        self.base = cast(_Base, build_model(base, layout, **params))
        d_tok = token_dim + (side_dim if side_info else 0)
        self.adapt = MLP(self.source_cfg.emb_dim, [token_dim], out_dim=token_dim)
        if side_info:  # the instance's responses known at the request (all, the named, or none) + its time gap
            self.side = ResponseEncoder(layout, side_dim, side_responses)
            self.recency = RecencyEncoding(side_dim)
        emb = self.base.embed
        q_in = emb.n_tokens * emb.dim if query == "compressed" else emb.seq_dim
        self.query = MLP(q_in, [2 * d_tok], out_dim=d_tok)
        if seq_model == "transformer":
            # self-attention layers over the tokens, then the query's target-aware cross-attention
            self.encoder = nn.ModuleList(TransformerBlock(d_tok, heads, ffn_mult) for _ in range(encoder_layers))
            self.cross = TransformerBlock(d_tok, heads, ffn_mult)
        else:
            self.attention = TargetAttention(d_tok)
        self.out = nn.Linear(d_tok, out_dim)
        if placement == "after":
            self.after_head = MLP(out_dim, [out_dim], out_dim=self.n_tasks)

    @property
    def token_input(self) -> TokenInput:
        """The instance tokens of the given store, or of the causal store its source config builds."""
        return TokenInput("iat", self.store_path, self.token_len)

    def iat_vector(self, batch: Batch) -> torch.Tensor:
        """[B, out_dim] the IAT branch's output for a batch."""
        # rows sharing a history (a served request's candidates): the token pass runs once per history
        f = batch.group_tokens()
        if f is None:
            raise ConfigError("IAT reads instance tokens: build its batches with the token source of its store")
        mask = f.mask
        full_mask = batch.expand_history(mask)
        tokens = self.adapt(f.payload)
        if self.side_info:
            side = self.side(f.responses, f.response_mask) + self.recency(f.gap, mask)
            tokens = torch.cat([tokens, side], dim=-1)
        tokens = tokens * mask.unsqueeze(-1)
        emb = self.base.embed
        q_in = emb(batch).flatten(1) if self.query_kind == "compressed" else emb.target_item(batch)
        q = self.query(q_in)
        if self.seq_kind == "transformer":
            enc = tokens
            for block in self.encoder:
                enc = block(enc, key_padding_mask(mask, tokens.shape[1]))
            # one context per history: a single one is broadcast over the B queries by the attention; several
            # (a served batch of requests) are each projected once, their rows' queries batched per history
            if enc.shape[0] in (1, len(batch)):
                pooled = self.cross(q.unsqueeze(1), key_padding_mask(mask, 1), context=enc)[:, 0]
            else:
                assert batch.history_group is not None
                pooled = self.cross.forward_grouped(q, enc, mask, batch.history_group)
            pooled = pooled * full_mask.any(1, keepdim=True)  # no history: the branch contributes only a bias
        elif tokens.shape[0] not in (1, len(batch)):  # several served requests: each history read once
            assert batch.history_group is not None
            pooled = self.attention.forward_grouped(q, tokens, mask, batch.history_group)
        else:
            pooled = self.attention(q, batch.expand_history(tokens), batch.expand_history(mask))
        return self.out(pooled)

    def forward(self, batch: Batch) -> ModelOutput:
        x = self.base.feature_input(batch)
        v = self.iat_vector(batch)
        if self.placement == "before":
            return ModelOutput(self.base.predict_from(torch.cat([x, v], dim=1)))
        return ModelOutput(self.base.predict_from(x) + self.after_head(v))
