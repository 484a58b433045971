"""Optimizers: AdamW with warm-up + decay schedules, global-norm clipping, a weight-decay mask,
learning-rate multipliers and freezing by parameter path.

Frozen parameters (e.g. LiT's locked image tower, `config.optim.freeze = "img/.*"`) get no
gradient (they enter the loss through `stop_gradient`, so autodiff never differentiates
through them) and no optimizer state (`optax.multi_transform` with `set_to_zero`), and their
values never change.
"""
from __future__ import annotations

import re
from typing import Any

import flax
import jax
import ml_collections
import optax


def param_paths(params: Any) -> Any:
  """A tree like `params` whose leaves are "a/b/c" path strings."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return flax.traverse_util.unflatten_dict({k: k for k in flat}, sep="/")


def path_mask(params: Any, pattern: str) -> Any:
  """Boolean tree: True where the parameter path fully matches the regex (all False if empty)."""
  if not pattern:
    return jax.tree.map(lambda _: False, params)
  regex = re.compile(pattern)
  return jax.tree.map(lambda path: regex.fullmatch(path) is not None, param_paths(params))


def required_mask(params: Any, pattern: str, field: str) -> Any:
  """`path_mask`, raising (naming the config `field`) when the pattern matches no parameter."""
  mask = path_mask(params, pattern)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"{field}={pattern!r} matches no parameter path; paths look like "
                     f"{next(iter(jax.tree.leaves(param_paths(params))))!r}")
  return mask


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up to `lr`, then cosine / linear decay to `end_lr_fraction * lr`, or constant."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  end = cfg.lr * cfg.end_lr_fraction
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_fraction)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.lr, end, decay_steps)
  elif cfg.schedule == "constant":
    decay = optax.constant_schedule(cfg.lr)
  else:
    raise ValueError(f"config.optim.schedule={cfg.schedule!r}; choose cosine, linear or constant")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict, params: Any, total_steps: int):
  """Returns (optimizer, lr_schedule, frozen_mask) for the parameter tree `params`."""
  lr = schedule(cfg, total_steps)
  if cfg.name != "adamw":
    raise ValueError(f"config.optim.name={cfg.name!r}; only 'adamw' is available")
  decay_mask = jax.tree.map(lambda excluded: not excluded, path_mask(params, cfg.wd_exclude))
  inner = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm else optax.identity(),
      optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  mask=decay_mask),
  )
  for pattern, factor in cfg.lr_multipliers:
    mask = required_mask(params, pattern, "config.optim.lr_multipliers pattern")
    inner = optax.chain(inner, optax.masked(optax.scale(float(factor)), mask))
  frozen = (required_mask(params, cfg.freeze, "config.optim.freeze") if cfg.freeze
            else path_mask(params, ""))
  labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen)
  tx = optax.multi_transform({"trained": inner, "frozen": optax.set_to_zero()}, labels)
  return tx, lr, frozen


def stop_frozen(params: Any, frozen: Any) -> Any:
  """Applies `stop_gradient` to frozen leaves so the loss is constant in them."""
  return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
