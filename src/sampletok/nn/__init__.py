"""Layers shared by every model: embeddings, MLP, attention (SDPA), Transformer, RankMixer, DCNv2 cross, and the
auxiliary response heads (multitask)."""

from sampletok.nn.embedding import FeatureEmbedding, ResponseEncoder
from sampletok.nn.layers import MLP, CrossNetV2, RankMixerBlock, SwishLayerNorm, TargetAttention, TransformerBlock
from sampletok.nn.multitask import ResponseHeads, aux_losses

__all__ = [
    "FeatureEmbedding",
    "ResponseEncoder",
    "MLP",
    "CrossNetV2",
    "RankMixerBlock",
    "TargetAttention",
    "TransformerBlock",
    "SwishLayerNorm",
    "ResponseHeads",
    "aux_losses",
]
