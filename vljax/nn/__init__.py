"""Building blocks shared by every model family."""
from vljax.nn.attention import (MultiHeadAttention, causal_mask, combine_masks,
                                dot_product_attention, padding_mask)
from vljax.nn.embeddings import (ConvStem, LearnedPosEmbed, PatchEmbed, RelativePositionBias,
                                 TokenEmbed, apply_rotary, relative_position_buckets,
                                 rotary_inv_freq, sincos_1d, sincos_2d)
from vljax.nn.layers import (Dense, LayerNorm, MlpBlock, RMSNorm, activation, constrain,
                             partitioned)
from vljax.nn.pooling import AttentionPool, pool_tokens
from vljax.nn.transformer import REMAT_POLICIES, Block, BlockConfig, Transformer

__all__ = [
    "AttentionPool", "Block", "BlockConfig", "ConvStem", "Dense", "LayerNorm", "LearnedPosEmbed",
    "MlpBlock", "MultiHeadAttention", "PatchEmbed", "REMAT_POLICIES", "RMSNorm",
    "RelativePositionBias", "TokenEmbed", "Transformer", "activation", "apply_rotary",
    "causal_mask", "combine_masks", "constrain", "dot_product_attention", "padding_mask",
    "partitioned", "pool_tokens", "relative_position_buckets", "rotary_inv_freq", "sincos_1d",
    "sincos_2d",
]
