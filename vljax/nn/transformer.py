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
from vljax.nn.lora import ATTENTION_TARGETS, GATED_MLP_TARGETS, MLP_TARGETS, LORA_TARGETS

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
  (LN(x + f(x))). `rms_norm` swaps LayerNorm for RMSNorm (LLaMA-style decoders). The defaults
  of the fields after `param_dtype` give the ViT/CLIP block; LLaMA sets num_kv_heads (grouped-
  query attention), rope_base (rotary self-attention), gated_mlp (SwiGLU with act="silu") and
  use_bias=False. T5 sets scale_attention=False (no 1 / sqrt(head_dim) on the logits) and
  cache_context (decode projects the cross-attention context once, see MultiHeadAttention).

  `lora_rank` > 0 adds LoRA adapters (`vljax.nn.lora`) to the projections named in
  `lora_targets`: "query", "key", "value", "out" (in self- and cross-attention) and the MLP's
  "fc1", "fc2" (or, gated, "gate", "up", "down"). With the default 0 the parameter tree is the
  one without adapters.
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
  num_kv_heads: int | None = None  # self-attention key/value heads; None: num_heads
  head_dim: int | None = None  # None: width // num_heads
  rope_base: float | None = None  # rotary self-attention with this base theta; None: none
  gated_mlp: bool = False  # act(x W_gate) * (x W_up) -> W_down instead of fc1 -> act -> fc2
  use_bias: bool = True  # biases of the attention and MLP projections (not of the norms)
  scale_attention: bool = True  # attention logits / sqrt(head_dim); False: T5
  cache_context: bool = False  # decode caches the cross-attention context's keys / values
  lora_rank: int = 0  # rank of the LoRA adapters; 0: none
  lora_alpha: float = 16.0  # adapters are scaled by lora_alpha / lora_rank (LoRA, peft)
  lora_targets: tuple[str, ...] = ("query", "value")  # projections with adapters (see above)

  def __post_init__(self):
    if self.norm_position not in ("pre", "post"):
      raise ValueError(f"Unknown norm_position {self.norm_position!r}; choose pre or post")
    if self.act not in ACTIVATIONS:
      raise ValueError(f"Unknown activation {self.act!r}; choose one of {sorted(ACTIVATIONS)}.")
    if self.num_kv_heads is not None and (self.num_kv_heads < 1 or
                                          self.num_heads % self.num_kv_heads):
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    if self.rope_base is not None and self.head_dim is not None and self.head_dim % 2:
      raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
    self._check_lora()

  def _check_lora(self):
    if isinstance(self.lora_targets, str):
      raise ValueError(f"lora_targets={self.lora_targets!r} must be a tuple of projection names, "
                       f"e.g. ({self.lora_targets!r},)")
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # lists stay hashable
    if self.lora_rank < 0:
      raise ValueError(f"lora_rank must be >= 0 (0: no adapters), got {self.lora_rank}")
    unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
    if unknown:
      raise ValueError(f"Unknown lora_targets {unknown}; choose among {list(LORA_TARGETS)}")
    mlp_names = GATED_MLP_TARGETS if self.gated_mlp else MLP_TARGETS
    absent = [t for t in self.lora_targets if t not in ATTENTION_TARGETS + mlp_names]
    if absent:
      raise ValueError(f"lora_targets {absent} are not in this block: its "
                       f"{'gated ' if self.gated_mlp else ''}MLP has {list(mlp_names)}")
    if self.lora_rank and not self.lora_targets:
      raise ValueError(f"lora_rank={self.lora_rank} but lora_targets is empty")

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
               context_bsd: jax.Array | None = None, context_mask: jax.Array | None = None,
               positions_bt: jax.Array | None = None, attention_bias: jax.Array | None = None):
    """`positions_bt` (int [B, T]) places the tokens for rotary self-attention;
    `attention_bias` is added to the self-attention logits (T5's relative position bias)."""
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, lora_rank=c.lora_rank,
              lora_alpha=c.lora_alpha, lora_targets=c.lora_targets)
    x_btd = constrain(x_btd, ("batch", "seq", "act_embed"))
    self_attn = MultiHeadAttention(c.num_heads, head_dim=c.head_dim, num_kv_heads=c.num_kv_heads,
                                   rope_base=c.rope_base, use_bias=c.use_bias, decode=c.decode,
                                   scale_logits=c.scale_attention, name="self_attn", **kw)
    x_btd = self._sublayer("self_attn", x_btd,
                           lambda h: self_attn(h, None, mask, positions_bt=positions_bt,
                                               bias=attention_bias))
    if self.cross_attention:
      cached_context = c.decode and c.cache_context
      if context_bsd is None and not cached_context:
        raise ValueError("this block has cross-attention but no context was given")
      cross_attn = MultiHeadAttention(c.num_heads, head_dim=c.head_dim, use_bias=c.use_bias,
                                      scale_logits=c.scale_attention, decode=cached_context,
                                      cache_context=c.cache_context, name="cross_attn", **kw)
      x_btd = self._sublayer("cross_attn", x_btd, lambda h: cross_attn(h, context_bsd, context_mask))
    mlp = MlpBlock(c.mlp_dim, c.act, c.dropout, gated=c.gated_mlp, use_bias=c.use_bias, name="mlp",
                   **kw)
    x_btd = self._sublayer("mlp", x_btd, lambda h: mlp(h, self.deterministic))
    return constrain(x_btd, ("batch", "seq", "act_embed"))


class _ScanBlock(Block):
  """Block with the (carry, per-layer output) signature that `nn.scan` expects."""

  @nn.compact
  def __call__(self, x_btd, mask, context_bsd, context_mask,  # pylint: disable=arguments-differ
               positions_bt, attention_bias):
    return super().__call__(x_btd, mask, context_bsd, context_mask, positions_bt,
                            attention_bias), None


class _ScanGroup(nn.Module):
  """`size` Blocks, only the last with cross-attention: the unit that a stack cross-attending
  every `size` layers repeats, so that it scans over identical units ("block_0".. per unit)."""

  config: BlockConfig
  size: int
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_btd, mask, context_bsd, context_mask, positions_bt, attention_bias):
    for j in range(self.size):
      x_btd = Block(self.config, cross_attention=j == self.size - 1,
                    deterministic=self.deterministic, name=f"block_{j}")(
                        x_btd, mask, context_bsd, context_mask, positions_bt, attention_bias)
    return x_btd, None


class Transformer(nn.Module):
  """`depth` Blocks; with `scan=True` the layers' parameters are stacked on a leading
  "layers" axis and the stack is one `nn.scan` (fast compiles for deep models); `remat` picks a
  rematerialisation policy from REMAT_POLICIES. An optional final norm follows a pre-norm stack.

  With `cross_attention`, layer i cross-attends to the context iff (i + 1) is a multiple of
  `cross_attention_every` (1: every layer; k: layers k-1, 2k-1, .., open_flamingo's placement).
  Scanned with k > 1, the stack scans over depth / k groups of k layers ("layers/block_j").
  """

  depth: int
  block: BlockConfig
  cross_attention: bool = False
  cross_attention_every: int = 1
  final_norm: bool = True
  scan: bool = False
  remat: str = "none"

  @nn.compact
  def __call__(self, x_btd: jax.Array, mask: jax.Array | None = None,
               context_bsd: jax.Array | None = None, context_mask: jax.Array | None = None,
               deterministic: bool = True, positions_bt: jax.Array | None = None,
               attention_bias: jax.Array | None = None) -> jax.Array:
    """`attention_bias` (broadcastable to [batch, heads, query, key]) is added to every layer's
    self-attention logits: T5's relative position bias, computed once per stack."""
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"Unknown remat policy {self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    every = self.cross_attention_every
    if every < 1:
      raise ValueError(f"cross_attention_every must be >= 1, got {every}")
    grouped = self.cross_attention and every > 1
    if self.scan:
      if grouped and self.depth % every:
        raise ValueError(f"a scanned stack cross-attending every {every} layers needs a depth "
                         f"that is a multiple of {every}, got {self.depth}")
      unit_cls = _ScanGroup if grouped else _ScanBlock
      unit_kw = (dict(config=self.block, size=every) if grouped else
                 dict(config=self.block, cross_attention=self.cross_attention))
      if self.remat != "none":
        unit_cls = nn.remat(unit_cls, prevent_cse=False, policy=REMAT_POLICIES[self.remat])
      length = self.depth // every if grouped else self.depth
      stack = nn.scan(unit_cls, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * 5, length=length,
                      metadata_params={nn.PARTITION_NAME: "layers"})(
                          name="layers", deterministic=deterministic, **unit_kw)
      x_btd, _ = stack(x_btd, mask, context_bsd, context_mask, positions_bt, attention_bias)
    else:
      block_cls = Block
      if self.remat != "none":
        block_cls = nn.remat(Block, prevent_cse=True, policy=REMAT_POLICIES[self.remat])
      for i in range(self.depth):
        cross = self.cross_attention and (i + 1) % every == 0
        block = block_cls(config=self.block, cross_attention=cross, deterministic=deterministic,
                          name=f"layer_{i}")
        x_btd = block(x_btd, mask, context_bsd, context_mask, positions_bt, attention_bias)
    c = self.block
    if self.final_norm and c.norm_position == "pre":
      x_btd = LayerNorm(c.norm_eps, rms=c.rms_norm, dtype=c.dtype, param_dtype=c.param_dtype,
                        name="final_norm")(x_btd)
    return x_btd
