"""Two-tower image-text models: CLIP, ALIGN, LiT and SigLIP differ only in configuration.

- CLIP: causal text tower pooled at EOT, softmax loss, learnable temperature (init 1/0.07).
- ALIGN: bidirectional (BERT-style) text tower pooled at CLS, softmax loss.
- LiT: any of these with the image tower locked (see `vljax.train.optim` freezing).
- SigLIP: sigmoid loss with learnable temperature and bias, initialised t' = log 10, b = -10.

`__call__(images, tokens)` returns `((zimg, ztxt), aux)`: L2-normalised embeddings (either may be
None when its input is None, so evaluators embed one side at a time) and aux with the
pre-projection features, `t` (= exp t', the logit scale) and `b` (the bias, sigmoid only).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.models.text import TextTransformer
from vljax.models.vit import ViT
from vljax.nn import partitioned


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
  return (x / jnp.maximum(norm, eps)).astype(x.dtype)


class TwoTower(nn.Module):
  """An image tower and a text tower projected into one embedding space."""

  image: dict  # ViT fields (variant, patch_size, pool, ...)
  text: dict  # TextTransformer fields (vocab_size, variant, causal, pool, ...)
  embed_dim: int = 512
  loss: str = "softmax"  # "softmax" (CLIP/ALIGN) | "sigmoid" (SigLIP)
  temperature_init: float | None = None  # t' such that scale = exp(t'); default by loss
  bias_init: float = -10.0  # SigLIP's b
  max_scale: float | None = 100.0  # CLIP clamps exp(t') at 100; None for no clamp
  dtype: Any = jnp.float32

  def setup(self):
    image = dict(self.image)
    text = dict(self.text)
    self.img = ViT(**{"out_dim": self.embed_dim, "dtype": self.dtype, **image}, name="img")
    self.txt = TextTransformer(**{"out_dim": self.embed_dim, "dtype": self.dtype, **text}, name="txt")
    if self.loss not in ("softmax", "sigmoid"):
      raise ValueError(f"Unknown two-tower loss {self.loss!r}; choose softmax or sigmoid")
    t_init = self.temperature_init
    if t_init is None:
      t_init = math.log(10.0) if self.loss == "sigmoid" else math.log(1 / 0.07)
    self.t_prime = self.param("t", partitioned(nn.initializers.constant(t_init), ()), ())
    if self.loss == "sigmoid":
      self.bias = self.param("b", partitioned(nn.initializers.constant(self.bias_init), ()), ())

  def __call__(self, images_bhwc: jax.Array | None, tokens_bt: jax.Array | None, train: bool = False):
    aux: dict[str, jax.Array] = {}
    zimg = ztxt = None
    if images_bhwc is not None:
      out, img_aux = self.img(images_bhwc, train=train)
      zimg = l2_normalize(out.astype(jnp.float32))
      aux["img/pre_logits"] = img_aux["pre_logits"]
      aux["img/tokens"] = img_aux["tokens"]
    if tokens_bt is not None:
      out, txt_aux = self.txt(tokens_bt, train=train)
      ztxt = l2_normalize(out.astype(jnp.float32))
      aux["txt/pre_logits"] = txt_aux["pre_logits"]
      aux["txt/tokens"] = txt_aux["tokens"]
    scale = jnp.exp(self.t_prime)
    if self.max_scale is not None:
      scale = jnp.minimum(scale, self.max_scale)
    aux["t"] = scale
    if self.loss == "sigmoid":
      aux["b"] = self.bias
    return (zimg, ztxt), aux
