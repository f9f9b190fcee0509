"""Layers shared by every model: embeddings, MLP, attention (SDPA), Transformer, RankMixer, DCNv2 cross."""

from sampletok.nn.embedding import FeatureEmbedding, ResponseEncoder
from sampletok.nn.layers import MLP, CrossNetV2, RankMixerBlock, TargetAttention, TransformerBlock

__all__ = [
    "FeatureEmbedding",
    "ResponseEncoder",
    "MLP",
    "CrossNetV2",
    "RankMixerBlock",
    "TargetAttention",
    "TransformerBlock",
]
