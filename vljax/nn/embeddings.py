"""Patch, token and positional embeddings (learned, 1-D and 2-D sin-cos)."""
from __future__ import annotations

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


def sincos_2d(height: int, width_patches: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """2-D sin-cos table [h * w, width] as in MoCo-v3 / big_vision: x and y each get width / 4 frequencies."""
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
  def __call__(self, x_btd: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    table = self.param("pos_embedding", partitioned(nn.initializers.normal(self.init_std),
                                                    (None, None, "embed")),
                       (1, self.length, x_btd.shape[-1]), self.param_dtype)
    if x_btd.shape[1] > self.length:
      raise ValueError(f"sequence length {x_btd.shape[1]} exceeds the position table ({self.length})")
    rows = jax.lax.dynamic_slice_in_dim(table, offset, x_btd.shape[1], axis=1)
    return x_btd + rows.astype(x_btd.dtype)
