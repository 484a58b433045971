"""Multi-head attention (self and cross) with boolean masks and an optional KV cache.

Masks are boolean, broadcastable to [batch, heads, query, key], True where attention is
allowed. The KV cache (``decode=True``) has a static maximum length and lives in the flax
"cache" collection, so `vljax.decode` can carry it through `lax.while_loop`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.nn.layers import Dtype, constrain, default_kernel_init, partitioned


def causal_mask(length: int) -> jax.Array:
  """[1, 1, T, T] lower-triangular mask: query i sees keys j <= i."""
  return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def padding_mask(valid_bk: jax.Array) -> jax.Array:
  """[B, 1, 1, K] mask from per-key validity [B, K] (e.g. tokens != pad)."""
  return valid_bk[:, None, None, :].astype(bool)


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical AND of the masks that are not None (None if all are)."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  out = present[0]
  for m in present[1:]:
    out = jnp.logical_and(out, m)
  return out


def dot_product_attention(q_bqhd: jax.Array, k_bkhd: jax.Array, v_bkhd: jax.Array,
                          mask: jax.Array | None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v, with logits and softmax in float32 whatever the input dtype."""
  depth = q_bqhd.shape[-1]
  logits_bhqk = jnp.einsum("bqhd,bkhd->bhqk", q_bqhd, k_bkhd,
                           preferred_element_type=jnp.float32) / jnp.sqrt(depth).astype(jnp.float32)
  if mask is not None:
    logits_bhqk = jnp.where(mask, logits_bhqk, jnp.finfo(jnp.float32).min)
  weights_bhqk = jax.nn.softmax(logits_bhqk, axis=-1).astype(v_bkhd.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights_bhqk, v_bkhd)


class MultiHeadAttention(nn.Module):
  """Multi-head attention: queries from `x_q`, keys/values from `x_kv` (self-attention if None).

  Projection kernels are [embed, heads, kv] so that checkpoints with fused [D, D] projections
  (CLIP, BERT, LLaMA) import with a reshape.
  """

  num_heads: int
  head_dim: int | None = None  # defaults to width // num_heads
  out_features: int | None = None  # defaults to the query width
  use_bias: bool = True
  dropout: float = 0.0  # on the attention output
  decode: bool = False  # use / update the KV cache (self-attention only)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_q: jax.Array, x_kv: jax.Array | None = None, mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    is_self = x_kv is None
    x_kv = x_q if is_self else x_kv
    width = x_q.shape[-1]
    if self.head_dim is None and width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = self.head_dim or width // self.num_heads

    def proj(name: str, x: jax.Array) -> jax.Array:
      return nn.DenseGeneral(
          (self.num_heads, head_dim), axis=-1, use_bias=self.use_bias, dtype=self.dtype,
          param_dtype=self.param_dtype,
          kernel_init=partitioned(default_kernel_init, ("embed", "heads", "kv")),
          bias_init=partitioned(nn.initializers.zeros, ("heads", "kv")), name=name)(x)

    q_bqhd = constrain(proj("query", x_q), ("batch", "seq", "act_heads", None))
    k_bkhd = constrain(proj("key", x_kv), ("batch", "seq", "act_heads", None))
    v_bkhd = constrain(proj("value", x_kv), ("batch", "seq", "act_heads", None))

    if self.decode:
      if not is_self:
        raise ValueError("The KV cache is for self-attention; cross-attention keys are static.")
      k_bkhd, v_bkhd, mask = self._update_cache(k_bkhd, v_bkhd, mask)

    out_bqhd = dot_product_attention(q_bqhd, k_bkhd, v_bkhd, mask)
    out_bqd = nn.DenseGeneral(
        self.out_features or width, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=partitioned(default_kernel_init, ("heads", "kv", "embed")),
        bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="out")(out_bqhd)
    return nn.Dropout(self.dropout)(out_bqd, deterministic=deterministic)

  def _update_cache(self, k_bkhd, v_bkhd, mask):
    """Writes this call's keys/values at the cache index and attends to the filled prefix.

    The cache is created (zeros, length = the key length of the initialising call) when the
    "cache" collection is mutable and empty; later calls append `T` new positions, with a
    causal mask inside the new block and full visibility of earlier positions.
    """
    initialised = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k_bkhd.shape, k_bkhd.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v_bkhd.shape, v_bkhd.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialised:
      return k_bkhd, v_bkhd, mask
    batch, max_len, heads, depth = cached_k.value.shape
    new_len = k_bkhd.shape[1]
    start = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_bkhd.astype(cached_k.value.dtype),
                                                  (0, start, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_bkhd.astype(cached_v.value.dtype),
                                                  (0, start, 0, 0))
    index.value = start + new_len
    query_pos = start + jnp.arange(new_len)
    key_pos = jnp.arange(max_len)
    cache_mask = (key_pos[None, :] <= query_pos[:, None])[None, None]  # [1, 1, T, L]
    # A caller mask over the new block only (e.g. the causal mask of a prompt) is superseded by
    # cache_mask; a caller mask over all L cached keys (padding) is combined with it.
    if mask is not None and mask.shape[-1] == max_len:
      cache_mask = jnp.logical_and(cache_mask, mask)
    del batch, heads, depth
    return cached_k.value, cached_v.value, cache_mask
