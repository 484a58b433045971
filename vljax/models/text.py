"""Text transformer encoders: causal (CLIP, pooled at the end-of-text token) and bidirectional
(BERT/ALIGN, pooled at a leading CLS token; SigLIP, pooled at the last token or by MAP).

Input tokens are [B, T] int32, right-padded with `pad_id`; the end-of-text token of each row is
its last non-pad token (the tokenizer appends EOS), so no special vocabulary order is assumed.
Checkpoints whose tokenizer pads with the end-of-text id (CLIP) say where the end of text is
instead: `eot_id` (its first occurrence, transformers' CLIP) or `pool="argmax"` (the largest id,
OpenAI's CLIP, whose EOT is the last id of the vocabulary); a [B, T] validity mask passed to
`__call__` replaces `tokens != pad_id` wherever the pads matter.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.models.sizes import resolve_sizes
from vljax.models.vit import VARIANTS
from vljax.nn import (AttentionPool, BlockConfig, Dense, LayerNorm, LearnedPosEmbed, TokenEmbed,
                      Transformer, causal_mask, combine_masks, constrain, padding_mask, pool_tokens)

# Sizes come from the ViT table (big_vision's convention): CLIP's ViT-B text tower (512 wide,
# 12 layers, 8 heads) is "M", its ViT-L/14 text tower "B", its ViT-H/14 text tower "L".
TEXT_VARIANTS = VARIANTS


def eot_index(tokens_bt: jax.Array, pad_id: int, valid_bt: jax.Array | None = None) -> jax.Array:
  """Index of the last valid token per row (0 for a row without one): valid where `valid_bt`
  is True, or else where the token is not `pad_id`. Counts the valid tokens, so it assumes
  right padding."""
  if valid_bt is None:
    valid_bt = tokens_bt != pad_id
  length_b = valid_bt.astype(jnp.int32).sum(axis=1)
  return jnp.maximum(length_b - 1, 0)


def first_index(tokens_bt: jax.Array, token_id: int) -> jax.Array:
  """Index of the first occurrence of `token_id` per row (0 for a row without it), as
  transformers' CLIPTextModel finds the end-of-text token when pads share its id."""
  return jnp.argmax(tokens_bt == token_id, axis=1)


class TextTransformer(nn.Module):
  """Token + position embeddings, a transformer, pooling and an optional linear projection."""

  vocab_size: int
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  max_len: int = 77
  causal: bool = True  # CLIP: causal; ALIGN/BERT, SigLIP: bidirectional
  # "eot" | "argmax" (the token with the largest id: OpenAI CLIP's EOT) | "cls" (first token) |
  # "last" | "gap" | "map"
  pool: str = "eot"
  pad_id: int = 0
  eot_id: int | None = None  # "eot" pools at this id's first occurrence; None: last non-pad token
  mask_padding: bool = True  # False: pads are ordinary tokens (big_vision / HF SigLIP)
  act: str = "gelu"
  norm_eps: float = 1e-6
  norm_position: str = "pre"  # "post" for BERT
  dropout: float = 0.0
  out_dim: int | None = None
  out_bias: bool = False
  scan: bool = False
  remat: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def sizes(self) -> dict[str, int]:
    """The size fields, from the variant where not given explicitly."""
    fields = ("width", "depth", "mlp_dim", "num_heads")
    variant_sizes = {}
    if self.variant is not None:
      if self.variant not in TEXT_VARIANTS:
        raise ValueError(f"Unknown text variant {self.variant!r}; sizes are {sorted(TEXT_VARIANTS)}")
      variant_sizes = dict(zip(fields, TEXT_VARIANTS[self.variant]))
    return resolve_sizes("TextTransformer", variant_sizes, self, fields)

  @nn.compact
  def __call__(self, tokens_bt: jax.Array, train: bool = False,
               valid_bt: jax.Array | None = None):
    """`valid_bt` (bool [B, T], e.g. transformers' attention_mask) marks the real tokens: pads
    are then masked as attention keys (whatever `mask_padding` says) and excluded from "gap" /
    "map" pooling and from the default "eot" position; None: tokens != pad_id."""
    s = self.sizes()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if tokens_bt.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens_bt.shape}")
    tokens_bt = constrain(tokens_bt, ("batch", "seq"))
    mask_padding = self.mask_padding or valid_bt is not None
    if valid_bt is None:
      valid_bt = tokens_bt != self.pad_id
    else:
      if valid_bt.shape != tokens_bt.shape:
        raise ValueError(f"valid_bt has shape {valid_bt.shape}, the tokens {tokens_bt.shape}")
      valid_bt = constrain(valid_bt.astype(bool), ("batch", "seq"))
    x = TokenEmbed(self.vocab_size, s["width"], name="token_embedding", **kw)(tokens_bt)
    x = LearnedPosEmbed(self.max_len, init_std=0.01, name="pos_embedding")(x)
    if self.norm_position == "post":  # BERT normalises the embeddings before the first layer
      x = LayerNorm(self.norm_eps, name="embed_norm", **kw)(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    mask = combine_masks(padding_mask(valid_bt) if mask_padding else None,
                         causal_mask(tokens_bt.shape[1]) if self.causal else None)
    block = BlockConfig(s["num_heads"], s["mlp_dim"], act=self.act, dropout=self.dropout,
                        norm_eps=self.norm_eps, norm_position=self.norm_position, **kw)
    x = Transformer(s["depth"], block, scan=self.scan, remat=self.remat,
                    name="encoder")(x, mask, deterministic=not train)
    aux = {"tokens": x}
    if self.pool == "eot":
      index_b = (eot_index(tokens_bt, self.pad_id, valid_bt) if self.eot_id is None
                 else first_index(tokens_bt, self.eot_id))
      pooled = pool_tokens(x, "index", index_b=index_b)
    elif self.pool == "argmax":
      pooled = pool_tokens(x, "index", index_b=jnp.argmax(tokens_bt, axis=1))
    elif self.pool == "map":
      pooled = AttentionPool(s["num_heads"], mlp_dim=s["mlp_dim"], norm_eps=self.norm_eps,
                             name="map_head", **kw)(x, padding_mask(valid_bt))[:, 0]
    else:
      pooled = pool_tokens(x, self.pool, valid_bt=valid_bt)
    aux["pre_logits"] = pooled
    out = pooled
    if self.out_dim is not None:
      out = Dense(self.out_dim, "embed", None, use_bias=self.out_bias, name="head", **kw)(pooled)
    return out, aux
