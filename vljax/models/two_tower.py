"""Two-tower image-text models: CLIP, ALIGN, LiT and SigLIP differ only in configuration.

- CLIP: causal text tower pooled at EOT, softmax loss, learnable temperature (init 1/0.07).
- ALIGN: bidirectional (BERT-style) text tower pooled at CLS, softmax loss.
- LiT: any of these with the image tower locked (see `vljax.train.optim` freezing).
- SigLIP: sigmoid loss with learnable temperature and bias, initialised t' = log 10, b = -10.

`__call__(images, tokens)` returns a dict of named outputs (see `TwoTower.__call__`): the
L2-normalised embeddings "zimg" / "ztxt" (None when that input is None, so evaluators embed one
side at a time), the logit "scale" (and "bias" for the sigmoid loss) and the towers'
intermediates under "img/..." and "txt/...".
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

CONTRASTIVE_LOSSES = ("softmax", "sigmoid")


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
  return (x / jnp.maximum(norm, eps)).astype(x.dtype)


def check_contrastive(contrastive: str) -> None:
  """Raises a ValueError unless `contrastive` names a contrastive loss."""
  if contrastive not in CONTRASTIVE_LOSSES:
    raise ValueError(f"Unknown contrastive loss {contrastive!r}; choose softmax or sigmoid")


def default_temperature_init(contrastive: str) -> float:
  """t' with logit scale exp(t'): log(1 / 0.07) for CLIP's softmax loss, log 10 for SigLIP's."""
  return math.log(10.0) if contrastive == "sigmoid" else math.log(1 / 0.07)


def logit_scale(t_prime: jax.Array, max_scale: float | None) -> jax.Array:
  """exp(t'), clamped at `max_scale` (CLIP's 100) unless that is None."""
  scale = jnp.exp(t_prime)
  return scale if max_scale is None else jnp.minimum(scale, max_scale)


def contrastive_parameters(module: nn.Module) -> tuple[jax.Array, jax.Array | None]:
  """Creates, in a module's `setup`, the learned t' (parameter "t") and for the sigmoid loss the
  bias b ("b") from its `contrastive`, `temperature_init` and `bias_init` fields; (t', b or None)."""
  check_contrastive(module.contrastive)
  t_init = module.temperature_init
  if t_init is None:
    t_init = default_temperature_init(module.contrastive)
  t_prime = module.param("t", partitioned(nn.initializers.constant(t_init), ()), ())
  if module.contrastive != "sigmoid":
    return t_prime, None
  return t_prime, module.param("b", partitioned(nn.initializers.constant(module.bias_init), ()), ())


def contrastive_outputs(t_prime: jax.Array, bias: jax.Array | None,
                        max_scale: float | None) -> dict[str, jax.Array]:
  """{"scale": exp(t') clamped at max_scale} and, for the sigmoid loss, {"bias": b}."""
  out = {"scale": logit_scale(t_prime, max_scale)}
  if bias is not None:
    out["bias"] = bias
  return out


class TwoTower(nn.Module):
  """An image tower and a text tower projected into one embedding space."""

  image: dict  # ViT fields (variant, patch_size, pool, ...)
  text: dict  # TextTransformer fields (vocab_size, variant, causal, pool, ...)
  embed_dim: int = 512
  contrastive: str = "softmax"  # "softmax" (CLIP/ALIGN) | "sigmoid" (SigLIP: adds the bias "b")
  temperature_init: float | None = None  # t' such that scale = exp(t'); default by contrastive
  bias_init: float = -10.0  # SigLIP's b
  max_scale: float | None = 100.0  # CLIP clamps exp(t') at 100; None for no clamp
  dtype: Any = jnp.float32

  def setup(self):
    check_contrastive(self.contrastive)
    image = dict(self.image)
    text = dict(self.text)
    self.img = ViT(**{"out_dim": self.embed_dim, "dtype": self.dtype, **image}, name="img")
    self.txt = TextTransformer(**{"out_dim": self.embed_dim, "dtype": self.dtype, **text}, name="txt")
    self.t_prime, self.bias = contrastive_parameters(self)

  def __call__(self, images_bhwc: jax.Array | None, tokens_bt: jax.Array | None,
               train: bool = False, *,
               text_valid_bt: jax.Array | None = None) -> dict[str, jax.Array | None]:
    """-> {"zimg": [B, D] or None, "ztxt": [B, D] or None, "scale": [] (exp t', clamped),
    "bias": [] (sigmoid only), "img/pre_logits", "img/tokens" (with images),
    "txt/pre_logits", "txt/tokens" (with tokens)}; the embeddings are float32, L2-normalised.
    `text_valid_bt` (bool [B, T]) marks the real text tokens (see TextTransformer.__call__)."""
    out: dict[str, jax.Array | None] = {"zimg": None, "ztxt": None}
    if images_bhwc is not None:
      features, img_aux = self.img(images_bhwc, train=train)
      out["zimg"] = l2_normalize(features.astype(jnp.float32))
      out["img/pre_logits"] = img_aux["pre_logits"]
      out["img/tokens"] = img_aux["tokens"]
    if tokens_bt is not None:
      features, txt_aux = self.txt(tokens_bt, train=train, valid_bt=text_valid_bt)
      out["ztxt"] = l2_normalize(features.astype(jnp.float32))
      out["txt/pre_logits"] = txt_aux["pre_logits"]
      out["txt/tokens"] = txt_aux["tokens"]
    return {**out, **contrastive_outputs(self.t_prime, self.bias, self.max_scale)}
