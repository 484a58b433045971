"""Patch, token and positional embeddings (learned, 1-D and 2-D sin-cos, rotary, T5's relative
position buckets)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vljax.nn.layers import Dtype, partitioned


def sincos_1d(length: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Transformer sin-cos position table [length, width] (sin on the first half, cos on the second)."""
  if width % 2:
    raise ValueError(f"sincos width must be even, got {width}")
  omega = 1.0 / temperature ** (np.arange(width // 2, dtype=np.float64) / (width // 2))
  angles = np.arange(length, dtype=np.float64)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def rotary_inv_freq(head_dim: int, base: float = 10_000.0) -> np.ndarray:
  """The head_dim / 2 rotary frequencies base ** (-2i / head_dim), float32 as transformers
  computes them (so positions in the thousands rotate by the same angles)."""
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  return (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)


def apply_rotary(x_bthd: jax.Array, positions_bt: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotary position embedding (Su et al. 2021, RoFormer) of queries or keys [B, T, H, D].

  The layout is transformers' LLaMA "rotate half": feature i is rotated together with feature
  i + D/2 (not 2i with 2i + 1, as in Meta's original code, whose checkpoints transformers
  permutes on conversion): x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]. Angles
  are float32; cos and sin are cast to x's dtype before the product, as transformers does.
  """
  inv_freq_f = jnp.asarray(rotary_inv_freq(x_bthd.shape[-1], base))
  angles_btf = jnp.asarray(positions_bt, jnp.float32)[..., None] * inv_freq_f
  angles_btd = jnp.concatenate([angles_btf, angles_btf], axis=-1)
  cos_bt1d = jnp.cos(angles_btd).astype(x_bthd.dtype)[:, :, None, :]
  sin_bt1d = jnp.sin(angles_btd).astype(x_bthd.dtype)[:, :, None, :]
  first_bthf, second_bthf = jnp.split(x_bthd, 2, axis=-1)
  rotated_bthd = jnp.concatenate([-second_bthf, first_bthf], axis=-1)
  return x_bthd * cos_bt1d + rotated_bthd * sin_bt1d


def sincos_2d(height: int, width_patches: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """2-D sin-cos table [h * w, width] as MoCo-v3's: x and y each get width / 4 frequencies
  temperature ** (-k / (width / 4)). (big_vision's `posemb_sincos_2d` divides by width / 4 - 1:
  its sincos ViTs would need that variant; no importer reads them yet.)"""
  if width % 4:
    raise ValueError(f"2-D sincos width must be a multiple of 4, got {width}")
  y, x = np.mgrid[:height, :width_patches]
  omega = 1.0 / temperature ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
  y_angles = y.reshape(-1, 1) * omega[None]
  x_angles = x.reshape(-1, 1) * omega[None]
  table = np.concatenate([np.sin(x_angles), np.cos(x_angles), np.sin(y_angles), np.cos(y_angles)], 1)
  return table.astype(np.float32)


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> linear projection, as a strided convolution. [B,H,W,C] -> [B,N,D]."""

  patch_size: int
  width: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images_bhwc: jax.Array) -> jax.Array:
    # Like a VALID convolution, a border narrower than a patch is dropped (SigLIP So400m/14 at 384
    # sees 27 x 27 patches).
    if min(images_bhwc.shape[1:3]) < self.patch_size:
      raise ValueError(f"image {images_bhwc.shape[1:3]} is smaller than one {self.patch_size}px patch")
    x = nn.Conv(self.width, (self.patch_size, self.patch_size), strides=self.patch_size,
                padding="VALID", use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=partitioned(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="conv")(images_bhwc)
    batch, gh, gw, dim = x.shape
    return x.reshape(batch, gh * gw, dim)


class ConvStem(nn.Module):
  """Early convolutions in place of patchify (Xiao et al. 2021, "Early Convolutions Help
  Transformers See Better"): log2(patch_size) 3x3 stride-2 convolutions, each followed by
  LayerNorm and ReLU, then a 1x1 convolution to the width. Same token grid as PatchEmbed, but
  local features that do not depend on where an edge falls within a patch. [B,H,W,C] -> [B,N,D]."""

  patch_size: int
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images_bhwc: jax.Array) -> jax.Array:
    num_convs = int(np.log2(self.patch_size))
    if 2 ** num_convs != self.patch_size:
      raise ValueError(f"a conv stem needs a power-of-two patch size, got {self.patch_size}")
    x = images_bhwc
    for i in range(num_convs):
      channels = max(self.width // 2 ** (num_convs - 1 - i), 8)
      x = nn.Conv(channels, (3, 3), strides=2, padding="SAME", use_bias=False, dtype=self.dtype,
                  param_dtype=self.param_dtype,
                  kernel_init=partitioned(nn.initializers.he_normal(), (None, None, None, None)),
                  name=f"conv_{i}")(x)
      x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                       scale_init=partitioned(nn.initializers.ones, (None,)),
                       bias_init=partitioned(nn.initializers.zeros, (None,)), name=f"norm_{i}")(x)
      x = nn.relu(x)
    x = nn.Conv(self.width, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=partitioned(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="proj")(x)
    batch, gh, gw, dim = x.shape
    return x.reshape(batch, gh * gw, dim)


class TokenEmbed(nn.Module):
  """Token ids -> vectors; `attend` gives tied output logits."""

  vocab_size: int
  width: int
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", partitioned(nn.initializers.normal(self.init_std), ("vocab", "embed")),
        (self.vocab_size, self.width), self.param_dtype)

  def __call__(self, tokens_bt: jax.Array) -> jax.Array:
    return jnp.take(jnp.asarray(self.embedding, self.dtype), tokens_bt, axis=0)

  def attend(self, x_btd: jax.Array) -> jax.Array:
    return jnp.einsum("btd,vd->btv", x_btd, jnp.asarray(self.embedding, self.dtype))


class LearnedPosEmbed(nn.Module):
  """A learned [1, length, width] table added to the input (sliced to the input length)."""

  length: int
  init_std: float = 0.02
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd: jax.Array, offset: jax.Array | int = 0,
               positions_bt: jax.Array | None = None) -> jax.Array:
    """Adds rows offset.. offset + T - 1, or row positions_bt[b, t] (int [B, T]) to x[b, t]."""
    table = self.param("pos_embedding", partitioned(nn.initializers.normal(self.init_std),
                                                    (None, None, "embed")),
                       (1, self.length, x_btd.shape[-1]), self.param_dtype)
    if x_btd.shape[1] > self.length:
      raise ValueError(f"sequence length {x_btd.shape[1]} exceeds the position table ({self.length})")
    if positions_bt is not None:
      rows = jnp.take(table[0], jnp.asarray(positions_bt, jnp.int32), axis=0, mode="clip")
    else:
      rows = jax.lax.dynamic_slice_in_dim(table, offset, x_btd.shape[1], axis=1)
    return x_btd + rows.astype(x_btd.dtype)


def _distance_buckets(num_buckets: int, max_distance: int) -> np.ndarray:
  """int32 [max_distance + 1]: T5's bucket of each distance 0..max_distance (one direction).

  Half the buckets hold the distances below num_buckets // 2 exactly; the other half split
  [num_buckets // 2, max_distance) logarithmically, and every farther distance shares the last
  bucket. float32 throughout, as Mesh TensorFlow and transformers compute it, so that the bins'
  edges fall on the same distances.
  """
  max_exact = num_buckets // 2
  if max_exact < 1 or max_distance <= max_exact:
    raise ValueError(f"relative position buckets need num_buckets >= 2 per direction and "
                     f"max_distance > {max_exact}; got {num_buckets} and {max_distance}")
  distance = np.arange(max_distance + 1)
  ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)
  log_ratio = np.log(ratio) / np.float32(np.log(max_distance / max_exact))
  large = max_exact + (log_ratio * np.float32(num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return np.where(distance < max_exact, distance, large).astype(np.int32)


def relative_position_buckets(relative_position: jax.Array, *, bidirectional: bool,
                              num_buckets: int, max_distance: int) -> jax.Array:
  """T5's bucket (Raffel et al. 2020, Mesh TensorFlow's `_relative_position_bucket`) of each
  relative position key - query, in [0, num_buckets).

  Bidirectional (encoder): half the buckets for keys at or before the query, half for keys
  after it. Unidirectional (causal decoder): only keys at or before the query are told apart,
  every later key falls in bucket 0 (it is masked anyway).
  """
  relative_position = jnp.asarray(relative_position, jnp.int32)
  if bidirectional:
    half = num_buckets // 2
    offset = jnp.where(relative_position > 0, half, 0)
    distance = jnp.abs(relative_position)
    table = _distance_buckets(half, max_distance)
  else:
    offset = 0
    distance = jnp.maximum(-relative_position, 0)
    table = _distance_buckets(num_buckets, max_distance)
  return offset + jnp.take(jnp.asarray(table), jnp.minimum(distance, max_distance))


class RelativePositionBias(nn.Module):
  """T5's relative position bias: one learned scalar per head and relative-position bucket,
  added to the self-attention logits. T5 computes it once per stack and shares it across the
  stack's layers (`Transformer(attention_bias=...)`). -> float32 [B|1, heads, query, key]."""

  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True  # encoder True; causal decoder False
  embedding_init: Any = nn.initializers.normal(1.0)
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """`query_positions` int [Q] or [B, Q], `key_positions` int [K] or [B, K]."""
    table_nh = self.param("embedding", partitioned(self.embedding_init, (None, "heads")),
                          (self.num_buckets, self.num_heads), self.param_dtype)
    query_bq = jnp.atleast_2d(jnp.asarray(query_positions, jnp.int32))
    key_bk = jnp.atleast_2d(jnp.asarray(key_positions, jnp.int32))
    relative_bqk = key_bk[:, None, :] - query_bq[:, :, None]
    buckets_bqk = relative_position_buckets(relative_bqk, bidirectional=self.bidirectional,
                                            num_buckets=self.num_buckets,
                                            max_distance=self.max_distance)
    bias_bqkh = jnp.take(table_nh, buckets_bqk, axis=0).astype(jnp.float32)
    return jnp.moveaxis(bias_bqkh, -1, 1)
