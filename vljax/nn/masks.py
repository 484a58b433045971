"""Attention masks from a batch's attention-type mask (big_vision's `mask_ar`).

`mask_ar[i]` is 0 for a token that joins the block of the token before it (bidirectional
attention inside a block, e.g. an image-and-question prefix) and 1 for a token that starts a new
block (autoregressive text). A query attends to every key whose block starts at or before its
own: all ones is causal attention, zeros then ones is prefix-LM attention.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(mask_ar_bl: jax.Array, valid_bl: jax.Array | None = None) -> jax.Array:
  """bool [B, 1, L, L] (batch, heads, query, key): query i attends key j iff
  cumsum(mask_ar)[j] <= cumsum(mask_ar)[i] and key j is valid.

  The rule is big_vision's PaliGemma `make_attn_mask`. Only keys are masked by `valid_bl`, so a
  padded query still attends the valid keys before it and no row of the softmax is empty. The
  result broadcasts against `MultiHeadAttention`'s [batch, heads, query, key] logits.
  """
  if mask_ar_bl.ndim != 2:
    raise ValueError(f"mask_ar must be [batch, length], got shape {mask_ar_bl.shape}")
  block_bl = jnp.cumsum(jnp.asarray(mask_ar_bl, jnp.int32), axis=-1)
  allowed_bqk = block_bl[:, None, :] <= block_bl[:, :, None]
  if valid_bl is not None:
    if valid_bl.shape != mask_ar_bl.shape:
      raise ValueError(f"valid {valid_bl.shape} and mask_ar {mask_ar_bl.shape} differ in shape")
    allowed_bqk = jnp.logical_and(allowed_bqk, jnp.asarray(valid_bl, bool)[:, None, :])
  return allowed_bqk[:, None]
