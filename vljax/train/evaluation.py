"""Runs a family's evaluators during training: zero-shot + retrieval for families that embed
images and texts, captioning for families that generate. Builds the jitted embedders and
generator once; evaluation sets are rendered once."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from vljax.data.pipeline import normalize_images
from vljax.evals.captioning import CaptioningEvaluator
from vljax.evals.contrastive import ImageTextEvaluator, batched
from vljax.evals.tfds_zeroshot import TfdsZeroShotEvaluator, zeroshot_specs
from vljax.sharding import batch_sharding, replicated

EVAL_DEFAULTS = dict(
    zeroshot_images=960,  # single-object validation scenes, over all colour x shape classes
    retrieval_pairs=1000,  # validation image-caption pairs
    captioning_images=200,  # validation scenes captioned by generative families
    batch_size=200,
    sample_images=8,  # images in samples.png
    # Zero-shot classification on TFDS datasets, for families that embed images and texts:
    # {short name: spec}, e.g. {"cifar100": dict(split="test")}, reported as
    # "zeroshot_<short name>/top1"; spec fields: vljax.evals.tfds_zeroshot.SPEC_DEFAULTS.
    tfds_zeroshot={},
)


def eval_config(cfg) -> ml_collections.ConfigDict:
  """EVAL_DEFAULTS updated by `cfg`; an unknown key (also in a tfds_zeroshot spec) raises."""
  unknown = sorted(set(cfg) - set(EVAL_DEFAULTS))
  if unknown:
    raise ValueError(f"Unknown config key(s) {', '.join('config.evals.' + k for k in unknown)}; "
                     f"valid keys: {', '.join(sorted(EVAL_DEFAULTS))}")
  merged = ml_collections.ConfigDict({**EVAL_DEFAULTS, **dict(cfg)})
  merged.tfds_zeroshot = zeroshot_specs(merged.tfds_zeroshot)
  return merged


def _put_global(x: np.ndarray, sharding) -> jax.Array:
  """A host array present on every process -> a global array with `sharding`."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class Evaluation:
  """The evaluators of one experiment (see `vljax.train.loop.Experiment`)."""

  def __init__(self, exp: Any, cfg: ml_collections.ConfigDict):
    self.exp, self.cfg = exp, cfg
    family, data = exp.family, exp.data_cfg
    self.image_text = self.captioning = None
    self.tfds_zeroshot: list[TfdsZeroShotEvaluator] = []
    if cfg.tfds_zeroshot and family.embed_images is None:
      raise ValueError(f"config.evals.tfds_zeroshot needs a family that embeds images and texts; "
                       f"{exp.config.family!r} does not")
    if family.embed_images is not None:
      self.image_text = ImageTextEvaluator(data, cfg, exp.tokenizer)
      self.tfds_zeroshot = [TfdsZeroShotEvaluator(key, spec, data, exp.tokenizer, cfg.batch_size)
                            for key, spec in cfg.tfds_zeroshot.items()]
      self._embed_images = self._jit(lambda p, x: family.embed_images(exp.model, p, self._normalize(x)))
      self._embed_texts = self._jit(lambda p, t: family.embed_texts(exp.model, p, t))
    if family.generate is not None and cfg.captioning_images:
      self.captioning = CaptioningEvaluator(data, cfg.captioning_images, cfg.batch_size, exp.tokenizer)
      tok = exp.tokenizer
      self._generate = self._jit(lambda p, x: family.generate(
          exp.model, p, self._normalize(x), max_new_tokens=data.max_text_len - 1,
          bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id))

  def _normalize(self, images):
    return normalize_images(images, self.exp.data_cfg.image_mean, self.exp.data_cfg.image_std)

  def _jit(self, fn):
    mesh, rules = self.exp.mesh, self.exp.rules
    jitted = jax.jit(fn, out_shardings=replicated(mesh))

    def run(params, x: np.ndarray) -> np.ndarray:
      x = np.asarray(x)
      out = jitted(params, _put_global(x, batch_sharding(mesh, rules, x.ndim)))
      return np.asarray(out.addressable_data(0))  # replicated: every process holds all of it
    return run

  def describe(self) -> str:
    """The evaluations `run` does, in words, for the log."""
    parts = []
    if self.image_text is not None:
      parts.append(f"zero-shot on {self.cfg.zeroshot_images} images, retrieval over "
                   f"{self.cfg.retrieval_pairs} pairs")
    parts += [f"zero-shot on TFDS {e.key}" for e in self.tfds_zeroshot]
    if self.captioning is not None:
      parts.append(f"captioning {self.cfg.captioning_images} images")
    return "; ".join(parts) or "nothing configured"

  def run(self, params) -> dict[str, float]:
    metrics = {}
    if self.image_text is not None:
      metrics.update(self.image_text.run(lambda x: self._embed_images(params, x),
                                         lambda t: self._embed_texts(params, t)))
    for evaluator in self.tfds_zeroshot:
      metrics.update(evaluator.run(lambda x: self._embed_images(params, x),
                                   lambda t: self._embed_texts(params, t)))
    if self.captioning is not None:
      metrics.update(self.captioning.run(lambda x: self._generate(params, x)))
    return metrics

  def samples(self, params) -> tuple[np.ndarray, list[list[str]]]:
    """Images and their lines for samples.png (generated caption first when there is one)."""
    count = self.cfg.sample_images
    if self.image_text is not None:
      images, lines = self.image_text.sample_lines(lambda x: self._embed_images(params, x), count)
    else:
      images = self.captioning.images[:count]
      lines = [[f"reference: {self.captioning.references[i][0]}"] for i in range(len(images))]
    if self.captioning is not None:
      tokens = batched(lambda x: self._generate(params, x), images, self.cfg.batch_size)
      generated = self.exp.tokenizer.decode(tokens)
      lines = [[f"generated: {g}"] + l for g, l in zip(generated, lines)]
    return images, lines
