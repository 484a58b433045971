"""The family contract: what every model family gives the one training loop and the evaluators.

A family is a frozen `Family` record in `vljax.families.FAMILIES`:

  name         the value of `config.family` (the only name of the model: there is no
               `config.model.name`);
  module       the flax module class; `config.model` holds its fields;
  model_fields the fields the family derives from the config and the tokenizer (vocabulary size,
               pad id, text length, which contrastive loss), as dotted paths;
  model_inputs the positional inputs of `module.__call__` from a prepared batch (initialisation
               runs it on a zero batch of the view's batch spec);
  loss_terms   a pure function (bound, params, batch, rng) -> LossTerms: what the loss is made
               of, split by how it combines over the examples of a batch;
  combine      (bound, LossTerms of the whole batch) -> (loss, metrics). The loss is
               combine(loss_terms(batch)); with `config.microbatches` the loop computes the terms
               per microbatch and still gets the whole batch's exact loss and gradient
               (`vljax.train.accumulate`), as gradient caching does for contrastive losses;
  predict      functions by name that evaluators ask for (see PREDICT_FUNCTIONS);
  views        the data views (`vljax.data.views`) it trains on.

`bind` ties a family to its built model and config as a `Bound`, which is what the loop and the
evaluators call: it normalises images (the one place that does), picks the contrastive loss (the
one place that does, from `config.loss`), and runs predict functions.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vljax.errors import ConfigError
from vljax.losses.contrastive import sigmoid_loss, softmax_loss

# What each predict function takes (a dict of batched, prepared inputs) and returns.
PREDICT_FUNCTIONS: dict[str, str] = {
    "embed_images": "{'image'} -> L2-normalised image embeddings [N, D]",
    "embed_texts": "{'text'} -> L2-normalised text embeddings [N, D]",
    "generate": "{'image' (families that see one), 'text' (right-padded prompt), 'prompt_len'}, "
                "max_new_tokens -> int32 [N, max_new_tokens] generated tokens, pad after EOS",
    "token_nll": "{'image' (families that see one), 'text', 'mask_ar', 'mask_loss'} -> {'nll': "
                 "summed negative log-likelihood of the scored tokens [N], 'tokens': their "
                 "number [N], optionally 'correct': how many of them are the argmax [N]}",
}
# Batch fields holding uint8 images; `Bound.prepare` normalises them.
IMAGE_FIELDS = ("image", "images", "frames")
CONTRASTIVE_LOSSES = ("softmax", "sigmoid")
# Derived model fields a config may set itself: to at least the derived value (a larger
# vocabulary, e.g. padded to a multiple of 128, or a longer position table) ...
AT_LEAST_FIELDS = ("vocab_size", "max_len")
# ... and those it may not (the tokenizer's pad id; the loss picks the contrastive form).
FIELD_OWNERS = {"pad_id": "the tokenizer", "contrastive": "config.loss.contrastive"}


class LossTerms(NamedTuple):
  """A loss's ingredients over a batch, by how they combine across its microbatches.

  examples  per-example arrays [B, ...] (the contrastive embeddings "zimg", "ztxt"): the whole
            batch's are the microbatches' concatenated, so a loss coupling all examples stays
            exact;
  shared    arrays that depend on the parameters only (the contrastive "scale", "bias"): the
            same in every microbatch;
  sums      float32 scalars that add up over microbatches (summed token NLLs and token counts).
  """

  examples: dict[str, jax.Array]
  shared: dict[str, jax.Array]
  sums: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Family:
  """A family's contribution to the loop and the evaluators (see the module docstring)."""

  name: str
  module: type[nn.Module]
  model_fields: Callable[[ml_collections.ConfigDict, Any], dict[str, Any]]
  model_inputs: Callable[[Mapping[str, jax.Array]], tuple]
  loss_terms: Callable[["Bound", Any, Mapping[str, jax.Array], jax.Array], LossTerms]
  combine: Callable[["Bound", LossTerms], tuple[jax.Array, dict]]
  predict: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  views: tuple[str, ...] = ("caption",)
  # Sub-module fields of `config.model` that hold a nested module's fields: field -> class.
  submodules: Mapping[str, type[nn.Module]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    unknown = sorted(set(self.predict) - set(PREDICT_FUNCTIONS))
    if unknown:
      raise ValueError(f"family {self.name!r} declares unknown predict function(s) {unknown}; "
                       f"known: {sorted(PREDICT_FUNCTIONS)}")


def _module_fields(cls: type[nn.Module]) -> set[str]:
  return {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}


def _check_fields(cls: type[nn.Module], cfg: Mapping[str, Any], where: str) -> None:
  valid = _module_fields(cls)
  unknown = sorted(set(cfg) - valid)
  if unknown:
    raise ConfigError(f"Unknown key(s) {', '.join(where + '.' + k for k in unknown)} for "
                      f"{cls.__name__}; valid keys: {', '.join(sorted(valid))}")


def model_config(family: Family, config: ml_collections.ConfigDict, tokenizer) -> dict[str, Any]:
  """`config.model` completed with the fields the family derives from the config and tokenizer,
  every key checked against the module (and its sub-modules) first."""
  fields = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  if "name" in fields:
    raise ConfigError(f"config.model.name={fields['name']!r}: remove it; config.family="
                      f"{family.name!r} alone chooses the model ({family.module.__name__})")
  _check_fields(family.module, fields, "config.model")
  for field, sub_cls in family.submodules.items():
    if field in fields:
      fields[field] = dict(fields[field])
      _check_fields(sub_cls, fields[field], f"config.model.{field}")
  for path, value in family.model_fields(config, tokenizer).items():
    *parents, key = path.split(".")
    node = fields
    for parent in parents:
      node = node.setdefault(parent, {})
    where = f"config.model.{path}"
    if key not in node:
      node[key] = value
    elif key in FIELD_OWNERS:
      if node[key] != value:
        raise ConfigError(f"{where}={node[key]!r} disagrees with {FIELD_OWNERS[key]} ({value!r}); "
                          f"remove {where}")
    elif key in AT_LEAST_FIELDS and node[key] < value:
      raise ConfigError(f"{where}={node[key]} is smaller than this data needs ({value})")
  fields["dtype"] = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
  return fields


def build_model(family: Family, config: ml_collections.ConfigDict, tokenizer) -> nn.Module:
  """The family's module built from `config.model` and what it derives from config and tokenizer."""
  return family.module(**model_config(family, config, tokenizer))


def normalize_images(images: jax.Array, mean, std) -> jax.Array:
  """uint8 images -> float32 (x / 255 - mean) / std, on device (transfers stay uint8)."""
  x = images.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def contrastive_options(config: ml_collections.ConfigDict, mesh: Mesh | None) -> dict[str, Any]:
  """impl / chunk_size (and for the ring, the mesh and the batch's mesh axes) from config.loss."""
  impl = config.loss.impl
  kw = dict(impl=impl, chunk_size=config.loss.chunk_size or None)
  if impl == "ring":
    if mesh is None:
      raise ValueError("config.loss.impl='ring' needs a mesh")
    # The ring runs over the mesh axes the batch is sharded over.
    batch_axes = nn.logical_to_mesh_axes(("batch",), [tuple(r) for r in config.sharding_rules])[0]
    batch_axes = tuple(a for a in (batch_axes if isinstance(batch_axes, tuple) else (batch_axes,))
                       if a in mesh.axis_names and mesh.shape[a] > 1)
    kw.update(mesh=mesh, axis=batch_axes or mesh.axis_names[0])
  return kw


@dataclasses.dataclass(frozen=True)
class Bound:
  """A family with its model, config and mesh: what the loop and the evaluators call."""

  family: Family
  model: nn.Module
  config: ml_collections.ConfigDict
  data: ml_collections.ConfigDict
  tokenizer: Any
  mesh: Mesh | None = None

  def prepare(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The batch with its uint8 image fields normalised: the one place images are."""
    return {k: normalize_images(v, self.data.image_mean, self.data.image_std)
            if k in IMAGE_FIELDS else v for k, v in batch.items()}

  def init(self, rng: jax.Array, spec: Mapping[str, jax.ShapeDtypeStruct]) -> Any:
    """Parameters from a one-example zero batch of the batch spec."""
    batch = {k: jnp.zeros((1,) + tuple(s.shape[1:]), s.dtype) for k, s in spec.items()}
    return self.model.init(rng, *self.family.model_inputs(self.prepare(batch)))["params"]

  def apply(self, params, *inputs, train: bool = False, rng: jax.Array | None = None,
            **kwargs) -> dict[str, Any]:
    rngs = {"dropout": rng} if rng is not None else {}
    return self.model.apply({"params": params}, *inputs, train=train, rngs=rngs, **kwargs)

  def loss_terms(self, params, batch: Mapping[str, jax.Array], rng: jax.Array) -> LossTerms:
    """The family's loss terms of a raw (uint8-image) batch."""
    return self.family.loss_terms(self, params, self.prepare(batch), rng)

  def combine(self, terms: LossTerms) -> tuple[jax.Array, dict]:
    return self.family.combine(self, terms)

  def loss(self, params, batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
    """(loss, metrics) of a raw batch in one piece."""
    return self.combine(self.loss_terms(params, batch, rng))

  def contrastive_terms(self, outputs: Mapping[str, jax.Array]) -> LossTerms:
    """The LossTerms of a contrastive loss from a model's outputs: the embeddings per example,
    the scale (and bias) shared."""
    shared = {k: outputs[k] for k in ("scale", "bias") if outputs.get(k) is not None}
    return LossTerms(examples={"zimg": outputs["zimg"], "ztxt": outputs["ztxt"]}, shared=shared,
                     sums={})

  def contrastive_loss(self, outputs: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """The contrastive loss `config.loss` chooses (softmax / sigmoid; naive / chunked / ring) on a
    model's "zimg", "ztxt", "scale" (and "bias") outputs, or on the `examples` and `shared` of
    LossTerms merged: the one place it is chosen."""
    kw = contrastive_options(self.config, self.mesh)
    scale = outputs["scale"]
    if self.config.loss.contrastive == "sigmoid":
      loss, metrics = sigmoid_loss(outputs["zimg"], outputs["ztxt"], scale, outputs["bias"], **kw)
      metrics = {**metrics, "b": outputs["bias"]}
    else:
      loss, metrics = softmax_loss(outputs["zimg"], outputs["ztxt"], scale, **kw)
    return loss, {**metrics, "t": scale}

  def has(self, name: str) -> bool:
    return name in self.family.predict

  def predict(self, name: str, params, inputs: Mapping[str, jax.Array], **kwargs):
    """Runs predict function `name` on a batch of raw (uint8-image) inputs."""
    if name not in self.family.predict:
      raise ValueError(f"family {self.family.name!r} has no predict function {name!r}; it has "
                       f"{sorted(self.family.predict) or 'none'}")
    return self.family.predict[name](self, params, self.prepare(inputs), **kwargs)


def bind(family: Family, config: ml_collections.ConfigDict, tokenizer, data_cfg,
         mesh: Mesh | None = None) -> Bound:
  return Bound(family, build_model(family, config, tokenizer), config, data_cfg, tokenizer, mesh)
