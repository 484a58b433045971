"""Evaluation of a checkpoint without training (`experiments/eval.py`).

The checkpoint is read by `vljax.convert.checkpoints.read` (a vljax workdir, a Hugging Face
CLIP / SigLIP / LM directory, ...). An imported one brings its model: `config_for` sets
config.family / model and the data and loss settings the checkpoint implies (image size and
normalisation, tokenizer, text length, contrastive loss) before the command line's overrides,
so any config with the wanted evaluators (config.evals) serves. `evaluate` builds the experiment
as training would, places the parameters with the training shardings, runs every configured
evaluator and writes metrics.json.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vljax.convert import checkpoints, hf
from vljax.files import write_atomically
from vljax.train.evaluation import Evaluation
from vljax.train.loop import Experiment, build_experiment

log = logging.getLogger("vljax")


def config_for(config: ml_collections.ConfigDict, imported: checkpoints.Imported,
               model_from_checkpoint: bool = True) -> ml_collections.ConfigDict:
  """`config` with the family, model and data / loss settings of an imported checkpoint (a vljax
  checkpoint, or `model_from_checkpoint=False`, leaves it as it is)."""
  if model_from_checkpoint:
    imported.apply_to(config)
  return config


def checkpoint_params(exp: Experiment, imported: checkpoints.Imported) -> Any:
  """The checkpoint's parameters in the layout (scanned or not), dtypes and shardings of `exp`'s
  model; raises naming missing, unexpected and misshapen parameters."""
  want = flax.traverse_util.flatten_dict(nn.meta.unbox(exp.abstract_state.params), sep="/")
  layouts = [imported.params]
  if imported.scanned is not None:
    layouts.append(imported.scanned(imported.params))
  flat = [flax.traverse_util.flatten_dict(nn.meta.unbox(p), sep="/") for p in layouts]
  got = next((f for f in flat if set(f) == set(want)), flat[0])
  hf.check_keys(want, got, f"the parameters of {imported.path}")
  for key in want:  # a ViT position table for another image size, resampled as its code does
    resized = checkpoints.resize_position_table(key, got[key], want[key].shape,
                                                imported.posemb_method)
    if resized is not None:
      got = {**got, key: resized}
  misshapen = [f"{k}: {tuple(np.shape(got[k]))} in the checkpoint, {tuple(want[k].shape)} in "
               f"the model" for k in want if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if misshapen:
    raise ValueError(f"{imported.path}: {len(misshapen)} parameter(s) of another shape than "
                     f"config.model builds: {'; '.join(misshapen[:5])}")
  shardings = flax.traverse_util.flatten_dict(exp.shardings.params, sep="/")
  placed = {}
  for key, abstract in want.items():
    value = np.asarray(got[key]).astype(abstract.dtype)
    placed[key] = jax.make_array_from_callback(value.shape, shardings[key],
                                               lambda index, v=value: v[index])
  return flax.traverse_util.unflatten_dict(placed, sep="/")


def evaluate(config: ml_collections.ConfigDict, imported: checkpoints.Imported,
             workdir: str) -> dict[str, float]:
  """Runs config.evals on the checkpoint's parameters; writes and returns the metrics.

  `workdir` receives metrics.json; a training workdir (one with checkpoints/) is refused, so a
  run's own final metrics are never replaced.
  """
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"--workdir={workdir} is a training workdir (it has checkpoints/); "
                     "evaluate into another directory so its metrics.json is kept")
  exp = build_experiment(config)
  with exp.context():
    params = checkpoint_params(exp, imported)
    evaluation = Evaluation(exp, config.evals)
    log.info("Evaluating %s (%s) with %s", imported.path, imported.format,
             evaluation.describe(evaluation.evaluators))
    metrics = {k: float(v) for k, v in evaluation.run(params).items()}
  if jax.process_index() == 0:
    text = json.dumps(metrics, indent=2, sort_keys=True).encode()
    write_atomically(os.path.join(workdir, "metrics.json"), lambda f: f.write(text))
    log.info("Evaluation: %s", json.dumps(metrics, sort_keys=True))
    log.info("Wrote metrics.json to %s", workdir)
  return metrics
