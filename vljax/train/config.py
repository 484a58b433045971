"""The config schema shared by every experiment, and its validation.

Every experiment config is `base_config()` with changes; a key that the base does not have is a
typo or a stale option, so `validate` rejects it (naming it, with the closest valid key) before
anything is built or compiled. Free-form sub-dicts (`model`, `data`, `evals`) are validated by
the code that consumes them (`vljax.models.build_model`, the data builders, the evaluators).
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any

import ml_collections

from vljax.sharding import DEFAULT_RULES

FREE_FORM = ("model", "data", "evals", "init")  # validated by their consumers
REQUIRED_TOP_LEVEL = ("total_steps", "log_every", "eval_every", "checkpoint_every", "seed")


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every key the training loop reads."""
  c = ml_collections.ConfigDict()
  c.family = "two_tower"  # which entry of vljax.train.families supplies loss and evaluators
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 128  # global, over all processes and devices
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.compute_dtype = "float32"  # or "bfloat16": activations and matmuls; parameters stay float32
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  c.sharding_rules = [list(r) for r in DEFAULT_RULES]

  c.model = ml_collections.ConfigDict()
  # impl: "naive" | "chunked" | "ring" (vljax.losses.contrastive); CoCa weighs its two losses.
  c.loss = ml_collections.ConfigDict(dict(impl="naive", chunk_size=0, contrastive_weight=1.0,
                                          caption_weight=2.0))

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.schedule = "cosine"  # "cosine" | "constant" | "linear"
  c.optim.warmup_steps = 100
  c.optim.end_lr_fraction = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.weight_decay = 1e-4
  # Regexes match whole parameter paths ("img/encoder/layer_0/mlp/fc1/bias").
  c.optim.wd_exclude = r"(.*/)?(bias|scale|pos_embedding|cls|probe|t|b)"  # no weight decay
  # ((regex, factor), ...): those parameters' updates are scaled by factor (as big_vision's
  # lr_mults), e.g. (("t|b", 10.0),) lets a short run move the contrastive scale and bias.
  c.optim.lr_multipliers = ()
  c.optim.grad_clip_norm = 1.0
  c.optim.freeze = ""  # regex on param paths ("img/.*" locks the image tower, as LiT)

  # Multi-host start-up (see vljax.train.distributed); VLJAX_* environment variables override.
  c.distributed = ml_collections.ConfigDict(dict(
      mode="off", coordinator_address="", num_processes=1, process_id=0, cpu_collectives="gloo"))

  c.data = ml_collections.ConfigDict()
  c.evals = ml_collections.ConfigDict()
  c.init = ml_collections.ConfigDict(dict(checkpoint="", params=""))
  return c


def _walk(config: Any, base: Any, prefix: str):
  for key in config.keys():
    path = f"{prefix}.{key}"
    if key not in base:
      close = difflib.get_close_matches(str(key), [str(k) for k in base.keys()], n=1)
      hint = f"; did you mean {prefix}.{close[0]}?" if close else ""
      raise ValueError(f"Unknown config key {path}{hint}")
    if prefix == "config" and key in FREE_FORM:
      continue
    if isinstance(config[key], ml_collections.ConfigDict) and isinstance(base[key], ml_collections.ConfigDict):
      _walk(config[key], base[key], path)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Rejects unknown keys and missing required ones, with a message naming the key."""
  _walk(config, base_config(), "config")
  for key in REQUIRED_TOP_LEVEL:
    if key not in config:
      raise ValueError(f"config.{key} is required")
  for key in ("total_steps", "log_every", "eval_every", "checkpoint_every", "batch_size"):
    if not isinstance(config[key], int) or config[key] < 0:
      raise ValueError(f"config.{key} must be a non-negative int, got {config[key]!r}")
  if config.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.compute_dtype must be float32 or bfloat16, got {config.compute_dtype!r}")
  return config


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "experiments", "configs")


def resolve_config_path(name: str) -> str:
  """`clip_tiny.py` (or `clip_tiny`) -> experiments/configs/clip_tiny.py; paths are kept."""
  path = name.split(":", 1)[0]
  if os.path.exists(path):
    return path
  candidate = os.path.join(CONFIG_DIR, path if path.endswith(".py") else path + ".py")
  if os.path.exists(candidate):
    return candidate
  available = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))
  raise FileNotFoundError(f"No config {name!r}: not a file, and not in {CONFIG_DIR} "
                          f"(available: {', '.join(available)})")


def load_config(name: str) -> ml_collections.ConfigDict:
  """Imports a config file and calls its `get_config(arg)`; `file.py:arg` passes `arg`."""
  path = resolve_config_path(name)
  arg = name.split(":", 1)[1] if ":" in name else None
  spec = importlib.util.spec_from_file_location(f"vljax_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()
