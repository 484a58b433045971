"""Multi-head attention (self and cross) with boolean masks and an optional KV cache.

Masks are boolean, broadcastable to [batch, heads, query, key], True where attention is
allowed. The KV cache (``decode=True``) has a static maximum length and lives in the flax
"cache" collection, so `vljax.decode` can carry it through `lax.while_loop`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.nn.embeddings import apply_rotary
from vljax.nn.layers import (Dtype, LoraDenseGeneral, constrain, default_kernel_init,
                             partitioned)


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


def _attention_weights(logits_bhqk: jax.Array, mask: jax.Array | None, dtype) -> jax.Array:
  if mask is not None:
    logits_bhqk = jnp.where(mask, logits_bhqk, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits_bhqk, axis=-1).astype(dtype)


def dot_product_attention(q_bqhd: jax.Array, k_bkhd: jax.Array, v_bkhd: jax.Array,
                          mask: jax.Array | None, *, bias: jax.Array | None = None,
                          scale_logits: bool = True) -> jax.Array:
  """softmax(q k^T / sqrt(d) + bias) v, with logits and softmax in float32 whatever the input
  dtype. `bias` (broadcastable to [batch, heads, query, key], e.g. T5's relative position bias)
  is added before masking; `scale_logits=False` drops the 1 / sqrt(d) (T5 folds it into the
  query kernel's initialisation).

  Keys and values may have fewer heads G than the queries' H (grouped-query attention, Ainslie
  et al. 2023; G = 1 is multi-query attention): query head h reads key/value head
  h // (H / G), as transformers' `repeat_kv` lays them out.
  """
  depth = q_bqhd.shape[-1]
  num_heads, num_kv_heads = q_bqhd.shape[2], k_bkhd.shape[2]
  scale = jnp.sqrt(depth).astype(jnp.float32) if scale_logits else jnp.float32(1.0)

  def add_bias(logits_bhqk):
    return logits_bhqk if bias is None else logits_bhqk + bias.astype(jnp.float32)

  if num_kv_heads == num_heads:
    logits_bhqk = jnp.einsum("bqhd,bkhd->bhqk", q_bqhd, k_bkhd,
                             preferred_element_type=jnp.float32) / scale
    weights_bhqk = _attention_weights(add_bias(logits_bhqk), mask, v_bkhd.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights_bhqk, v_bkhd)
  if num_heads % num_kv_heads:
    raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} key/value heads")
  batch, q_len = q_bqhd.shape[:2]
  k_len, group = k_bkhd.shape[1], num_heads // num_kv_heads
  q_bqgrd = q_bqhd.reshape(batch, q_len, num_kv_heads, group, depth)
  logits_bgrqk = jnp.einsum("bqgrd,bkgd->bgrqk", q_bqgrd, k_bkhd,
                            preferred_element_type=jnp.float32) / scale
  logits_bhqk = add_bias(logits_bgrqk.reshape(batch, num_heads, q_len, k_len))
  weights_bhqk = _attention_weights(logits_bhqk, mask, v_bkhd.dtype)
  weights_bgrqk = weights_bhqk.reshape(batch, num_kv_heads, group, q_len, k_len)
  out_bqgrd = jnp.einsum("bgrqk,bkgd->bqgrd", weights_bgrqk, v_bkhd)
  return out_bqgrd.reshape(batch, q_len, num_heads, depth)


class MultiHeadAttention(nn.Module):
  """Multi-head attention: queries from `x_q`, keys/values from `x_kv` (self-attention if None).

  Projection kernels are [embed, heads, kv] so that checkpoints with fused [D, D] projections
  (CLIP, BERT, LLaMA) import with a reshape. `head_dim` may differ from width // num_heads;
  keys and values have `num_kv_heads` heads (grouped-query attention); with `rope_base` queries
  and keys get rotary position embeddings (`vljax.nn.embeddings.apply_rotary`) at `positions_bt`
  before keys are cached.

  T5 sets `scale_logits=False` (the 1 / sqrt(head_dim) is folded into the query kernel's
  initialisation instead), passes its relative position bias as `bias`, and sets
  `cache_context` on cross-attention: with `decode`, the context's keys and values are then
  projected once, by the call that passes the context (e.g. over zero new tokens when a
  generation cache is made), and read from the "cache" collection by later calls, which pass
  `x_kv=None`.

  With `lora_rank` > 0 the projections named in `lora_targets` ("query", "key", "value", "out")
  get LoRA adapters (`vljax.nn.layers.LoraDenseGeneral`): A [embed, rank] and B [rank, heads, kv]
  for query / key / value, A [heads, kv, rank] and B [rank, embed] for out.
  """

  num_heads: int
  head_dim: int | None = None  # defaults to width // num_heads
  num_kv_heads: int | None = None  # defaults to num_heads; fewer: grouped-query attention
  rope_base: float | None = None  # rotary embeddings of this base theta (self-attention only)
  out_features: int | None = None  # defaults to the query width
  use_bias: bool = True
  dropout: float = 0.0  # on the attention output
  decode: bool = False  # use / update the KV cache (self-attention, or cache_context)
  scale_logits: bool = True  # divide the logits by sqrt(head_dim); T5 does not
  cache_context: bool = False  # cross-attention whose context keys / values decode caches
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora_rank: int = 0  # 0: no adapters
  lora_alpha: float = 16.0  # adapters are scaled by lora_alpha / lora_rank
  lora_targets: tuple[str, ...] = ()  # projection names that get adapters

  @nn.compact
  def __call__(self, x_q: jax.Array, x_kv: jax.Array | None = None, mask: jax.Array | None = None,
               deterministic: bool = True, positions_bt: jax.Array | None = None,
               bias: jax.Array | None = None) -> jax.Array:
    """`positions_bt` (int [B, T]) places the queries (and keys) for rotary embeddings; by
    default 0..T-1, after the cached positions in decode mode. `bias` is added to the attention
    logits (broadcastable to [batch, heads, query, key]; in decode mode its keys are the
    cache's)."""
    if self.cache_context and x_kv is None and not self.decode:
      raise ValueError("cross-attention needs a context (x_kv) outside decode mode")
    is_self = x_kv is None and not self.cache_context
    x_kv = x_q if is_self else x_kv
    width = x_q.shape[-1]
    if self.head_dim is None and width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = self.head_dim or width // self.num_heads
    num_kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                       f"{num_kv_heads}")

    query_init = default_kernel_init
    if not self.scale_logits:  # Mesh TensorFlow's T5: q ~ (d_model * head_dim) ** -0.5
      query_init = lambda *a: default_kernel_init(*a) * head_dim ** -0.5

    def dense(name: str, features: tuple[int, ...], axis: tuple[int, ...],
              names: tuple[str, ...], kernel_init) -> nn.Module:
      kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                name=name)
      if self.lora_rank and name in self.lora_targets:
        return LoraDenseGeneral(features, axis, names, rank=self.lora_rank,
                                alpha=self.lora_alpha, kernel_init=kernel_init, **kw)
      return nn.DenseGeneral(features, axis=axis, kernel_init=partitioned(kernel_init, names),
                             bias_init=partitioned(nn.initializers.zeros,
                                                   names[len(axis):]), **kw)

    def proj(name: str, x: jax.Array, heads: int) -> jax.Array:
      kernel_init = query_init if name == "query" else default_kernel_init
      return dense(name, (heads, head_dim), (-1,), ("embed", "heads", "kv"), kernel_init)(x)

    q_bqhd = constrain(proj("query", x_q, self.num_heads), ("batch", "seq", "act_heads", None))
    if self.decode and self.cache_context:
      k_bkhd, v_bkhd = self._context_cache(x_kv, lambda name, x: proj(name, x, num_kv_heads))
    else:
      k_bkhd = constrain(proj("key", x_kv, num_kv_heads), ("batch", "seq", "act_heads", None))
      v_bkhd = constrain(proj("value", x_kv, num_kv_heads), ("batch", "seq", "act_heads", None))

    if self.decode and not self.cache_context and is_self and positions_bt is None:
      raise ValueError("decode-mode self-attention needs positions_bt: the KV cache slot of "
                       "each new token is its position")
    if self.rope_base is not None:
      if not is_self:
        raise ValueError("rotary embeddings are for self-attention; cross-attention has none")
      if positions_bt is None:
        positions_bt = jnp.arange(x_q.shape[1])[None, :]
      positions_bt = jnp.broadcast_to(positions_bt, x_q.shape[:2])
      q_bqhd = apply_rotary(q_bqhd, positions_bt, self.rope_base)
      k_bkhd = apply_rotary(k_bkhd, positions_bt, self.rope_base)

    if self.decode and not self.cache_context:
      if not is_self:
        raise ValueError("The KV cache is for self-attention; cross-attention keys are static "
                         "unless cache_context is set.")
      k_bkhd, v_bkhd, mask = self._update_cache(k_bkhd, v_bkhd, mask, positions_bt)

    out_bqhd = dot_product_attention(q_bqhd, k_bkhd, v_bkhd, mask, bias=bias,
                                     scale_logits=self.scale_logits)
    out_bqd = dense("out", (self.out_features or width,), (-2, -1), ("heads", "kv", "embed"),
                    default_kernel_init)(out_bqhd)
    return nn.Dropout(self.dropout)(out_bqd, deterministic=deterministic)

  def _update_cache(self, k_bkhd, v_bkhd, mask, positions_bt):
    """Writes this call's keys / values into the cache at their positions and attends to them.

    The cache slot of a token is its position, per row: `positions_bt` (int [B, T], or [1, T]
    for every row) must be consecutive within a row (a prompt, or one new token), so rows of
    different prompt lengths each continue at their own position. A query at position p sees
    the slots <= p; a slot past a row's prompt that holds a padding token's keys is overwritten
    by that row's next token before any query can see it. The cache (zeros, length = the key
    length of the initialising call) is created when the "cache" collection is mutable and
    empty; that call attends to its own tokens only.
    """
    initialised = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k_bkhd.shape, k_bkhd.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v_bkhd.shape, v_bkhd.dtype)
    if not initialised:
      return k_bkhd, v_bkhd, mask
    batch, max_len = cached_k.value.shape[:2]
    positions_bt = jnp.broadcast_to(jnp.asarray(positions_bt, jnp.int32),
                                    (batch, k_bkhd.shape[1]))
    start_b = positions_bt[:, 0]

    def write(cache_blhd, new_bthd):
      new_bthd = new_bthd.astype(cache_blhd.dtype)
      return jax.vmap(lambda c, x, s: jax.lax.dynamic_update_slice_in_dim(c, x, s, axis=0))(
          cache_blhd, new_bthd, start_b)

    cached_k.value = write(cached_k.value, k_bkhd)
    cached_v.value = write(cached_v.value, v_bkhd)
    key_pos = jnp.arange(max_len)
    cache_mask = (key_pos[None, None, :] <= positions_bt[:, :, None])[:, None]  # [B, 1, T, L]
    # A caller mask over the new block only (e.g. the causal mask of a prompt) is superseded by
    # cache_mask; a caller mask over all L cached keys (padding, prefix-LM) is combined with it.
    if mask is not None and mask.shape[-1] == max_len:
      cache_mask = jnp.logical_and(cache_mask, mask)
    return cached_k.value, cached_v.value, cache_mask

  def _context_cache(self, x_kv: jax.Array | None, project) -> tuple[jax.Array, jax.Array]:
    """Cross-attention keys / values: projected from the context and stored when one is given
    (with a mutable "cache"), else read from the cache (made by an earlier call)."""
    if x_kv is None:
      if not self.has_variable("cache", "context_key"):
        raise ValueError("cross-attention has no cached context keys: pass the context once "
                         "(to make the cache) before decoding without it")
      return (self.get_variable("cache", "context_key"),
              self.get_variable("cache", "context_value"))
    k_bkhd = constrain(project("key", x_kv), ("batch", "seq", "act_heads", None))
    v_bkhd = constrain(project("value", x_kv), ("batch", "seq", "act_heads", None))
    if self.is_mutable_collection("cache"):
      self.put_variable("cache", "context_key", k_bkhd)
      self.put_variable("cache", "context_value", v_bkhd)
    return k_bkhd, v_bkhd
