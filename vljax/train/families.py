"""Model families: what each contributes to the one training loop.

A family names its model inputs, its loss (a pure function of parameters and a batch) and its
evaluators. The loop (`vljax.train.loop`) knows nothing else about any family.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from vljax.data.pipeline import normalize_images
from vljax.losses.contrastive import sigmoid_loss, softmax_loss
from vljax.models import coca


@dataclasses.dataclass(frozen=True)
class LossContext:
  """Static things a loss needs besides parameters and a batch."""

  model: nn.Module
  config: ml_collections.ConfigDict
  data: ml_collections.ConfigDict
  mesh: Mesh | None = None


def contrastive_kwargs(ctx: LossContext) -> dict:
  """impl / chunk_size (and for the ring, the mesh and the batch's mesh axes) from config.loss."""
  impl = ctx.config.loss.impl
  kw = dict(impl=impl, chunk_size=ctx.config.loss.chunk_size or None)
  if impl == "ring":
    if ctx.mesh is None:
      raise ValueError("config.loss.impl='ring' needs a mesh")
    # The ring runs over the mesh axes the batch is sharded over.
    batch_axes = nn.logical_to_mesh_axes(("batch",), [tuple(r) for r in ctx.config.sharding_rules])[0]
    batch_axes = tuple(a for a in (batch_axes if isinstance(batch_axes, tuple) else (batch_axes,))
                       if a in ctx.mesh.axis_names and ctx.mesh.shape[a] > 1)
    kw.update(mesh=ctx.mesh, axis=batch_axes or ctx.mesh.axis_names[0])
  return kw


def contrastive_loss(ctx: LossContext, zimg, ztxt, aux) -> tuple[jax.Array, dict]:
  """The two-tower contrastive loss chosen by the model (softmax / sigmoid) and config.loss."""
  kw = contrastive_kwargs(ctx)
  if "b" in aux:
    loss, metrics = sigmoid_loss(zimg, ztxt, aux["t"], aux["b"], **kw)
    metrics = {**metrics, "b": aux["b"]}
  else:
    loss, metrics = softmax_loss(zimg, ztxt, aux["t"], **kw)
  return loss, {**metrics, "t": aux["t"]}


def two_tower_loss(ctx: LossContext, params, batch: Mapping[str, jax.Array], rng: jax.Array):
  images = normalize_images(batch["image"], ctx.data.image_mean, ctx.data.image_std)
  (zimg, ztxt), aux = ctx.model.apply({"params": params}, images, batch["text"], train=True,
                                      rngs={"dropout": rng})
  return contrastive_loss(ctx, zimg, ztxt, aux)


def two_tower_embed_images(model: nn.Module, params, images_bhwc: jax.Array) -> jax.Array:
  (zimg, _), _ = model.apply({"params": params}, images_bhwc, None)
  return zimg


def two_tower_embed_texts(model: nn.Module, params, tokens_bt: jax.Array) -> jax.Array:
  (_, ztxt), _ = model.apply({"params": params}, None, tokens_bt)
  return ztxt


def coca_family_loss(ctx: LossContext, params, batch: Mapping[str, jax.Array], rng: jax.Array):
  images = normalize_images(batch["image"], ctx.data.image_mean, ctx.data.image_std)
  return coca.coca_loss(ctx.model, params, images, batch["text"], rng,
                        contrastive_weight=ctx.config.loss.contrastive_weight,
                        caption_weight=ctx.config.loss.caption_weight,
                        contrastive_kwargs=contrastive_kwargs(ctx))


def coca_embed_images(model: nn.Module, params, images_bhwc: jax.Array) -> jax.Array:
  (zimg, _, _), _ = model.apply({"params": params}, images_bhwc, None)
  return zimg


def coca_embed_texts(model: nn.Module, params, tokens_bt: jax.Array) -> jax.Array:
  # Training embeds the decoder inputs text[:, :-1] ([BOS w.. EOS pad..] shifted), so do we.
  (_, ztxt, _), _ = model.apply({"params": params}, None, tokens_bt[:, :-1])
  return ztxt


def coca_generate(model: nn.Module, params, images_bhwc: jax.Array, **kw) -> jax.Array:
  return coca.generate(model, params, images_bhwc, **kw)


@dataclasses.dataclass(frozen=True)
class Family:
  """A family's contribution to the loop."""

  loss_fn: Callable[[LossContext, Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]
  init_inputs: Callable[[ml_collections.ConfigDict], tuple]  # dummy model inputs for init
  batch_spec: Callable[[ml_collections.ConfigDict, int], dict]  # shapes of a global batch
  embed_images: Callable | None = None  # (model, params, normalised images) -> [N, D]
  embed_texts: Callable | None = None  # (model, params, tokens) -> [N, D]
  # (model, params, normalised images, *, max_new_tokens, bos_id, eos_id, pad_id) -> tokens [N, T]
  generate: Callable | None = None
  # (model config dict, tokenizer, data config) -> model config with vocabulary fields filled
  fill_model: Callable[[dict, Any, ml_collections.ConfigDict], dict] = lambda cfg, tok, data: cfg


def _image_text_inputs(data: ml_collections.ConfigDict) -> tuple:
  return (jnp.zeros((1, data.image_size, data.image_size, 3), jnp.float32),
          jnp.zeros((1, data.max_text_len), jnp.int32))


def image_text_batch_spec(data: ml_collections.ConfigDict, batch_size: int) -> dict:
  """Shapes of one global training batch of an image-text family."""
  return {"image": jax.ShapeDtypeStruct((batch_size, data.image_size, data.image_size, 3), jnp.uint8),
          "text": jax.ShapeDtypeStruct((batch_size, data.max_text_len), jnp.int32),
          "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}


def _fill_two_tower(cfg: dict, tokenizer, data: ml_collections.ConfigDict) -> dict:
  text = dict(cfg.get("text", {}))
  text.setdefault("vocab_size", tokenizer.vocab_size)
  text.setdefault("max_len", data.max_text_len)
  text.setdefault("pad_id", tokenizer.pad_id)
  return {**cfg, "text": text}


def _fill_coca(cfg: dict, tokenizer, data: ml_collections.ConfigDict) -> dict:
  cfg = dict(cfg)
  cfg.setdefault("vocab_size", tokenizer.vocab_size)
  cfg.setdefault("max_len", data.max_text_len - 1)  # decoder inputs are text[:, :-1]
  cfg.setdefault("pad_id", tokenizer.pad_id)
  return cfg


def _coca_inputs(data: ml_collections.ConfigDict) -> tuple:
  return (jnp.zeros((1, data.image_size, data.image_size, 3), jnp.float32),
          jnp.zeros((1, data.max_text_len - 1), jnp.int32))


FAMILIES: dict[str, Family] = {
    "two_tower": Family(two_tower_loss, _image_text_inputs, image_text_batch_spec,
                        two_tower_embed_images, two_tower_embed_texts,
                        fill_model=_fill_two_tower),
    "coca": Family(coca_family_loss, _coca_inputs, image_text_batch_spec, coca_embed_images,
                   coca_embed_texts, coca_generate, fill_model=_fill_coca),
}


def get_family(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f"config.family={name!r}; choose one of {sorted(FAMILIES)}")
  return FAMILIES[name]
