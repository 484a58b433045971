"""Sequence pooling: CLS token, global average, and attention pooling with learned queries
(big_vision's MAP head; CoCa's attentional poolers)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.nn.attention import MultiHeadAttention
from vljax.nn.layers import Dtype, Initializer, LayerNorm, MlpBlock, partitioned


def pool_tokens(x_btd: jax.Array, kind: str, valid_bt: jax.Array | None = None,
                index_b: jax.Array | None = None) -> jax.Array:
  """Parameter-free pooling: "first"/"cls" (token 0), "last", "gap" (masked mean) or "index"."""
  if kind in ("first", "cls", "tok"):
    return x_btd[:, 0]
  if kind == "last":
    return x_btd[:, -1]
  if kind == "gap":
    if valid_bt is None:
      return x_btd.mean(axis=1)
    w_bt = valid_bt.astype(x_btd.dtype)
    return (x_btd * w_bt[..., None]).sum(1) / jnp.maximum(w_bt.sum(1, keepdims=True), 1)
  if kind == "index":
    if index_b is None:
      raise ValueError("pool 'index' needs index_b")
    return jnp.take_along_axis(x_btd, index_b[:, None, None], axis=1)[:, 0]
  raise ValueError(f"Unknown pooling {kind!r}; choose first, cls, last, gap, index or map")


class AttentionPool(nn.Module):
  """`num_queries` learned queries ("probe") cross-attend to the tokens: [B, T, D] -> [B, Q, W].

  With `mlp_dim` set this is big_vision's MAP head (attention, then LayerNorm + MLP residual);
  without, it is CoCa's attentional pooler (attention, then LayerNorm). The queries, and so the
  output, have width `width` (default: the token width D); CoCa's queries have the decoder width
  and attend to image tokens of the ViT width (praxis's query_dims).
  """

  num_heads: int
  num_queries: int = 1
  width: int | None = None  # query and output width; None: the token width
  mlp_dim: int | None = None
  act: str = "gelu"  # the MAP head's MLP activation (SigLIP: "gelu_tanh", as its encoder)
  probe_init: Initializer = nn.initializers.xavier_uniform()  # CoCa: normal(width ** -0.5)
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    batch = x_btd.shape[0]
    width = self.width or x_btd.shape[-1]
    probe = self.param("probe", partitioned(self.probe_init, (None, None, "embed")),
                       (1, self.num_queries, width), self.param_dtype)
    probe_bqw = jnp.broadcast_to(probe, (batch, self.num_queries, width)).astype(self.dtype)
    x_bqw = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                               name="attn")(probe_bqw, x_btd, mask)
    if self.mlp_dim is None:
      return LayerNorm(self.norm_eps, dtype=self.dtype, name="norm")(x_bqw)
    y_bqw = LayerNorm(self.norm_eps, dtype=self.dtype, name="norm")(x_bqw)
    return x_bqw + MlpBlock(self.mlp_dim, self.act, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="mlp")(y_bqw)
