"""Building blocks shared by every model family."""
from vljax.nn.attention import (MultiHeadAttention, causal_mask, combine_masks,
                                dot_product_attention, padding_mask)
from vljax.nn.embeddings import (ConvStem, LearnedPosEmbed, PatchEmbed, TokenEmbed, sincos_1d, sincos_2d)
from vljax.nn.layers import Dense, LayerNorm, MlpBlock, activation, constrain, partitioned
from vljax.nn.pooling import AttentionPool, pool_tokens
from vljax.nn.transformer import REMAT_POLICIES, Block, BlockConfig, Transformer

__all__ = [
    "AttentionPool", "Block", "BlockConfig", "ConvStem", "Dense", "LayerNorm", "LearnedPosEmbed",
    "MlpBlock", "MultiHeadAttention", "PatchEmbed", "REMAT_POLICIES", "TokenEmbed", "Transformer",
    "activation", "causal_mask", "combine_masks", "constrain", "dot_product_attention",
    "padding_mask", "partitioned", "pool_tokens", "sincos_1d", "sincos_2d",
]
