"""Transformer blocks and stacks (optionally scanned over layers and rematerialised)."""
from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.nn.attention import MultiHeadAttention
from vljax.nn.layers import Dtype, LayerNorm, MlpBlock, constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
  """One transformer layer: self-attention, optional cross-attention, MLP, each residual.

  `norm_position="pre"` is the ViT/CLIP/GPT layout (x + f(LN(x))); "post" is BERT's
  (LN(x + f(x))).
  """

  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  dropout: float = 0.0
  norm_eps: float = 1e-6
  norm_position: Literal["pre", "post"] = "pre"
  rms_norm: bool = False
  cross_attention: bool = False
  decode: bool = False
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _sublayer(self, name: str, x: jax.Array, fn) -> jax.Array:
    norm = LayerNorm(self.norm_eps, rms=self.rms_norm, dtype=self.dtype, param_dtype=self.param_dtype,
                     name=f"{name}_norm")
    drop = nn.Dropout(self.dropout)
    if self.norm_position == "pre":
      return x + drop(fn(norm(x)), deterministic=self.deterministic)
    return norm(x + drop(fn(x), deterministic=self.deterministic))

  @nn.compact
  def __call__(self, x_btd: jax.Array, mask: jax.Array | None = None,
               context_bsd: jax.Array | None = None, context_mask: jax.Array | None = None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x_btd = constrain(x_btd, ("batch", "seq", "act_embed"))
    self_attn = MultiHeadAttention(self.num_heads, decode=self.decode, name="self_attn", **kw)
    x_btd = self._sublayer("self_attn", x_btd, lambda h: self_attn(h, None, mask))
    if self.cross_attention:
      if context_bsd is None:
        raise ValueError("this block has cross-attention but no context was given")
      cross_attn = MultiHeadAttention(self.num_heads, name="cross_attn", **kw)
      x_btd = self._sublayer("cross_attn", x_btd, lambda h: cross_attn(h, context_bsd, context_mask))
    mlp = MlpBlock(self.mlp_dim, self.act, self.dropout, name="mlp", **kw)
    x_btd = self._sublayer("mlp", x_btd, lambda h: mlp(h, self.deterministic))
    return constrain(x_btd, ("batch", "seq", "act_embed"))


class _ScanBlock(Block):
  """Block with the (carry, per-layer output) signature that `nn.scan` expects."""

  @nn.compact
  def __call__(self, x_btd, mask, context_bsd, context_mask):  # pylint: disable=arguments-differ
    return super().__call__(x_btd, mask, context_bsd, context_mask), None


class Transformer(nn.Module):
  """`depth` Blocks; with `scan=True` the layers' parameters are stacked on a leading
  "layers" axis and the stack is one `nn.scan` (fast compiles for deep models); `remat` picks a
  rematerialisation policy from REMAT_POLICIES. An optional final norm follows the stack.
  """

  depth: int
  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  dropout: float = 0.0
  norm_eps: float = 1e-6
  norm_position: Literal["pre", "post"] = "pre"
  rms_norm: bool = False
  final_norm: bool = True
  cross_attention: bool = False
  scan: bool = False
  remat: str = "none"
  decode: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd: jax.Array, mask: jax.Array | None = None,
               context_bsd: jax.Array | None = None, context_mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"Unknown remat policy {self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    block_kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, act=self.act,
                    dropout=self.dropout, norm_eps=self.norm_eps, norm_position=self.norm_position,
                    rms_norm=self.rms_norm, cross_attention=self.cross_attention,
                    decode=self.decode, deterministic=deterministic, dtype=self.dtype,
                    param_dtype=self.param_dtype)
    block_cls = _ScanBlock if self.scan else Block
    if self.remat != "none":
      block_cls = nn.remat(block_cls, prevent_cse=not self.scan, policy=REMAT_POLICIES[self.remat])
    if self.scan:
      stack = nn.scan(block_cls, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})(name="layers", **block_kw)
      x_btd, _ = stack(x_btd, mask, context_bsd, context_mask)
    else:
      for i in range(self.depth):
        x_btd = block_cls(name=f"layer_{i}", **block_kw)(x_btd, mask, context_bsd, context_mask)
    if self.final_norm and self.norm_position == "pre":
      x_btd = LayerNorm(self.norm_eps, rms=self.rms_norm, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="final_norm")(x_btd)
    return x_btd
