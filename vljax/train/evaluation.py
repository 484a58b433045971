"""Runs the configured evaluators (`config.evals`, see `vljax.evals.base`) during training.

Builds each evaluator once (their evaluation sets are rendered once), checks at start-up that the
family has every predict function they need, and gives them a `predict` that runs the family's
jitted predict functions over host arrays in fixed-size batches (the last one padded, so each
compiles once per batch size).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

# Importing the evaluator modules registers their types.
from vljax.evals import captioning, contrastive, generative, tfds_zeroshot
from vljax.evals.base import EVALUATORS, Environment, build_evaluators, evaluator_settings
from vljax.sharding import batch_sharding, replicated


def _put_global(x: np.ndarray, sharding) -> jax.Array:
  """A host array present on every process -> a global array with `sharding`."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _pad_rows(inputs: Mapping[str, np.ndarray], start: int, size: int) -> tuple[dict, int]:
  chunk = {k: np.asarray(v)[start:start + size] for k, v in inputs.items()}
  rows = len(next(iter(chunk.values())))
  if rows < size:
    chunk = {k: np.concatenate([v, np.repeat(v[-1:], size - rows, axis=0)])
             for k, v in chunk.items()}
  return chunk, rows


def batch_shards(mesh, rules) -> int:
  """How many ways a global batch's leading axis is split on `mesh`."""
  entry = batch_sharding(mesh, rules, 1).spec[0]
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def check_evals(evals: Mapping[str, Any]) -> None:
  """Validates every entry of config.evals (types, keys) without building anything."""
  for name, entry in dict(evals).items():
    evaluator_settings(name, entry)


class Evaluation:
  """The evaluators of one experiment (see `vljax.train.loop.Experiment`)."""

  def __init__(self, exp: Any, evals: Mapping[str, Any]):
    self.exp = exp
    env = Environment(exp.data_cfg, exp.tokenizer, exp.config.family, exp.family.views,
                      tuple(sorted(exp.family.predict)))
    self.evaluators = build_evaluators(evals, env, set(exp.family.predict))
    self._jitted: dict[tuple, Any] = {}

  def _jit(self, name: str, options: tuple):
    key = (name, options)
    if key not in self._jitted:
      bound = self.exp.bound
      self._jitted[key] = jax.jit(lambda p, x: bound.predict(name, p, x, **dict(options)),
                                  out_shardings=replicated(self.exp.mesh))
    return self._jitted[key]

  def predictor(self, params, batch_size: int):
    """predict(name, inputs, **options) over host arrays -> host arrays (or dicts of them).

    Batches are rounded up to a multiple of the devices the batch axis is split over (the
    padding rows are dropped), so any evaluator batch size runs on any mesh."""
    mesh, rules = self.exp.mesh, self.exp.rules
    batch_size = -(-batch_size // batch_shards(mesh, rules)) * batch_shards(mesh, rules)

    def predict(name: str, inputs: Mapping[str, np.ndarray], **options):
      fn = self._jit(name, tuple(sorted(options.items())))
      total = len(next(iter(inputs.values())))
      outputs = []
      for start in range(0, total, batch_size):
        chunk, rows = _pad_rows(inputs, start, batch_size)
        chunk = {k: _put_global(v, batch_sharding(mesh, rules, v.ndim)) for k, v in chunk.items()}
        out = fn(params, chunk)  # replicated: every process holds all of it
        outputs.append(jax.tree.map(lambda a: np.asarray(a.addressable_data(0))[:rows], out))
      return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)
    return predict

  def due(self, step: int, eval_every: int, final: bool = False) -> list:
    """The evaluators to run at `step` (all of them at the final step)."""
    def is_due(evaluator) -> bool:
      every = evaluator.settings.every or eval_every
      return final or bool(every and step % every == 0)
    return [e for e in self.evaluators if is_due(e)]

  def describe(self, evaluators=None) -> str:
    """The evaluations `run` does, in words, for the log."""
    return "; ".join(e.describe() for e in (self.evaluators if evaluators is None else evaluators)
                     ) or "nothing configured"

  def run(self, params, evaluators=None) -> dict[str, float]:
    metrics = {}
    for evaluator in self.evaluators if evaluators is None else evaluators:
      metrics.update(evaluator.run(self.predictor(params, evaluator.settings.batch_size)))
    return metrics

  def samples(self, params, count: int = 8) -> tuple[np.ndarray, list[list[str]]] | None:
    """Images and their lines for samples.png: the first evaluator with images to show gives
    them, every evaluator that can say something about them adds lines; None if none can."""
    images = lines = None
    for evaluator in self.evaluators:
      predict = self.predictor(params, evaluator.settings.batch_size)
      if images is None:
        found = evaluator.sample(predict, count)
        if found is not None:
          images, lines = found[0], [list(l) for l in found[1]]
          continue
    if images is None:
      return None
    for evaluator in self.evaluators:
      extra = evaluator.annotate(self.predictor(params, evaluator.settings.batch_size), images)
      if extra is not None:
        lines = [e + l for e, l in zip(extra, lines)]
    return images, lines


__all__ = ["EVALUATORS", "Evaluation", "check_evals"]
EVALUATOR_MODULES = (captioning, contrastive, generative, tfds_zeroshot)  # registered types
