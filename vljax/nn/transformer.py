"""Transformer blocks and stacks (optionally scanned over layers and rematerialised).

A model describes its layers once, with a `BlockConfig`, and hands it to every stack it builds:
`Transformer(depth, block=BlockConfig(num_heads=12, mlp_dim=3072), cross_attention=..., ...)`.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.nn.attention import MultiHeadAttention
from vljax.nn.layers import ACTIVATIONS, Dtype, LayerNorm, MlpBlock, constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """What one transformer layer is made of; shared by every layer of a stack (and by a model's
  stacks). Frozen and hashable, so it can be a field of a flax module.

  `norm_position="pre"` is the ViT/CLIP/GPT layout (x + f(LN(x))); "post" is BERT's
  (LN(x + f(x))). `rms_norm` swaps LayerNorm for RMSNorm (LLaMA-style decoders).
  """

  num_heads: int
  mlp_dim: int
  act: str = "gelu"  # a key of vljax.nn.layers.ACTIVATIONS
  dropout: float = 0.0  # after attention and MLP outputs, and inside the MLP
  norm_eps: float = 1e-6
  norm_position: Literal["pre", "post"] = "pre"
  rms_norm: bool = False
  decode: bool = False  # self-attention reads and appends to a KV cache ("cache" collection)
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.norm_position not in ("pre", "post"):
      raise ValueError(f"Unknown norm_position {self.norm_position!r}; choose pre or post")
    if self.act not in ACTIVATIONS:
      raise ValueError(f"Unknown activation {self.act!r}; choose one of {sorted(ACTIVATIONS)}.")

  def replace(self, **changes) -> BlockConfig:
    """A copy with `changes` applied (e.g. `decode=True` for a generation clone)."""
    return dataclasses.replace(self, **changes)


class Block(nn.Module):
  """One transformer layer: self-attention, optional cross-attention, MLP, each residual."""

  config: BlockConfig
  cross_attention: bool = False  # attend to `context_bsd` after self-attention
  deterministic: bool = True  # no dropout

  def _sublayer(self, name: str, x: jax.Array, fn) -> jax.Array:
    c = self.config
    norm = LayerNorm(c.norm_eps, rms=c.rms_norm, dtype=c.dtype, param_dtype=c.param_dtype,
                     name=f"{name}_norm")
    drop = nn.Dropout(c.dropout)
    if c.norm_position == "pre":
      return x + drop(fn(norm(x)), deterministic=self.deterministic)
    return norm(x + drop(fn(x), deterministic=self.deterministic))

  @nn.compact
  def __call__(self, x_btd: jax.Array, mask: jax.Array | None = None,
               context_bsd: jax.Array | None = None, context_mask: jax.Array | None = None):
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    x_btd = constrain(x_btd, ("batch", "seq", "act_embed"))
    self_attn = MultiHeadAttention(c.num_heads, decode=c.decode, name="self_attn", **kw)
    x_btd = self._sublayer("self_attn", x_btd, lambda h: self_attn(h, None, mask))
    if self.cross_attention:
      if context_bsd is None:
        raise ValueError("this block has cross-attention but no context was given")
      cross_attn = MultiHeadAttention(c.num_heads, name="cross_attn", **kw)
      x_btd = self._sublayer("cross_attn", x_btd, lambda h: cross_attn(h, context_bsd, context_mask))
    mlp = MlpBlock(c.mlp_dim, c.act, c.dropout, name="mlp", **kw)
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
  rematerialisation policy from REMAT_POLICIES. An optional final norm follows a pre-norm stack.
  """

  depth: int
  block: BlockConfig
  cross_attention: bool = False
  final_norm: bool = True
  scan: bool = False
  remat: str = "none"

  @nn.compact
  def __call__(self, x_btd: jax.Array, mask: jax.Array | None = None,
               context_bsd: jax.Array | None = None, context_mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"Unknown remat policy {self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    block_kw = dict(config=self.block, cross_attention=self.cross_attention,
                    deterministic=deterministic)
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
    c = self.block
    if self.final_norm and c.norm_position == "pre":
      x_btd = LayerNorm(c.norm_eps, rms=c.rms_norm, dtype=c.dtype, param_dtype=c.param_dtype,
                        name="final_norm")(x_btd)
    return x_btd
